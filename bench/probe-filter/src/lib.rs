//! A proxy-wasm HTTP filter that makes exactly the host calls named in its
//! configuration, and nothing else: what each host call costs under the wasm
//! runtime, so `make bench` can split aoai-msi-filter's cost into the host
//! calls any filter doing this work must make and the filter's own logic.
//!
//! Configuration: the first line lists operations, the second (for `set`)
//! holds the `authorization` value.
//!
//! - `authority`: read `:authority` (the host copies it into the VM);
//! - `headers`: read every request header in one call, as aoai-msi-filter
//!   does;
//! - `clock`: read the host's clock;
//! - `remove`: remove `api-key`;
//! - `set`: set `authorization`;
//! - `status`: read `:status` of the response;
//! - `cluster`: read the routed cluster (`xds.cluster_name`) before the
//!   writes above and again after them, and send both to the upstream as
//!   `x-probe-cluster-before` / `x-probe-cluster-after`: what a filter can
//!   learn of Envoy matching the route again after its own header writes;
//! - `route`: read the routed cluster (`xds.cluster_name`) once in the
//!   request headers and once in the response headers, as aoai-msi-filter
//!   does to bind its credential to where Envoy sends the request;
//! - `content_type_as_string`: read the response's `content-type` through the
//!   SDK's `String` getter, as aoai-msi-filter once did. The getter unwraps
//!   UTF-8, so a non-UTF-8 value aborts the VM: `make test` uses this to show
//!   what Envoy's wasm `failure_policy` does with a crashed VM.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(ProbeRoot { ops: Rc::new(Ops::default()) }));
}}

#[derive(Default)]
struct Ops {
    authority: bool,
    headers: bool,
    clock: bool,
    remove: bool,
    set: Option<String>,
    status: bool,
    cluster: bool,
    route: bool,
    content_type_as_string: bool,
}

impl Ops {
    fn parse(config: &str) -> Result<Ops, String> {
        let mut lines = config.splitn(2, '\n');
        let names = lines.next().unwrap_or_default();
        let value = lines.next().unwrap_or_default();
        let mut ops = Ops::default();
        for name in names.split_whitespace() {
            match name {
                "authority" => ops.authority = true,
                "headers" => ops.headers = true,
                "clock" => ops.clock = true,
                "remove" => ops.remove = true,
                "set" => ops.set = Some(value.to_owned()),
                "status" => ops.status = true,
                "cluster" => ops.cluster = true,
                "route" => ops.route = true,
                "content_type_as_string" => ops.content_type_as_string = true,
                other => return Err(format!("unknown probe operation `{other}`")),
            }
        }
        Ok(ops)
    }
}

/// The cluster Envoy's route sends the current request to, as bytes
/// (`-` when the host has none).
fn routed_cluster() -> Vec<u8> {
    hostcalls::get_property(vec!["xds", "cluster_name"])
        .ok()
        .flatten()
        .unwrap_or_else(|| b"-".to_vec())
}

struct ProbeRoot {
    ops: Rc<Ops>,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Ops::parse(&String::from_utf8_lossy(&config)) {
            Ok(ops) => {
                self.ops = Rc::new(ops);
                true
            }
            Err(e) => {
                let _ = hostcalls::log(proxy_wasm::types::LogLevel::Error, &e);
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            ops: Rc::clone(&self.ops),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    ops: Rc<Ops>,
}

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.ops.authority {
            let host = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":authority");
            std::hint::black_box(host.ok());
        }
        if self.ops.headers {
            std::hint::black_box(hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok());
        }
        if self.ops.clock {
            std::hint::black_box(hostcalls::get_current_time().ok());
        }
        if self.ops.route {
            std::hint::black_box(routed_cluster());
        }
        let before = self.ops.cluster.then(routed_cluster);
        if self.ops.remove {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "api-key", None);
        }
        if let Some(value) = &self.ops.set {
            let _ =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, "authorization", Some(value));
        }
        if let Some(before) = before {
            let after = routed_cluster();
            for (name, value) in [
                ("x-probe-cluster-before", before),
                ("x-probe-cluster-after", after),
            ] {
                let _ =
                    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(&value));
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.ops.route {
            std::hint::black_box(routed_cluster());
        }
        if self.ops.status {
            let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status");
            std::hint::black_box(status.ok());
        }
        if self.ops.content_type_as_string {
            std::hint::black_box(self.get_http_response_header("content-type"));
        }
        Action::Continue
    }
}

//! Metric ids, defined on first use. Defining the same name again in another
//! worker yields the same Envoy stat, so every worker adds to one counter.
//!
//! Every flush looks its metrics up again, on each request when a native
//! worker goes idle: the lookup compares the metric and its label values
//! in place (a worker has a few dozen at most), so the stat name is
//! formatted once, when the metric is defined. A gauge is written only when
//! its value changes.

use super::host::{say, Host};
use crate::metrics::Metric;

#[derive(Default)]
pub struct Metrics {
    defined: Vec<Defined>,
}

struct Defined {
    metric: &'static str,
    labels: Box<[String]>,
    id: Option<u32>,
    /// The gauge value last set (none for counters, or before the first set).
    value: Option<u64>,
}

impl Metrics {
    fn entry<H: Host>(&mut self, h: &H, metric: Metric, labels: &[&str]) -> Option<&mut Defined> {
        let found = self.defined.iter().position(|d| {
            d.metric == metric.name
                && d.labels
                    .iter()
                    .map(String::as_str)
                    .eq(labels.iter().copied())
        });
        let index = match found {
            Some(index) => index,
            None => {
                let name = metric.stat_name(labels);
                let id = h
                    .define_metric(metric.kind, &name)
                    .map_err(|status| say!(h, Warn, "cannot define metric {name}: {status:?}"))
                    .ok();
                self.defined.push(Defined {
                    metric: metric.name,
                    labels: labels.iter().map(|l| (*l).to_owned()).collect(),
                    id,
                    value: None,
                });
                self.defined.len() - 1
            }
        };
        self.defined.get_mut(index)
    }

    /// Add to a counter or gauge.
    pub fn add<H: Host>(&mut self, h: &H, metric: Metric, labels: &[&str], delta: i64) {
        if let Some(id) = self.entry(h, metric, labels).and_then(|d| d.id) {
            let _ = h.increment_metric(id, delta);
        }
    }

    /// Set a gauge (written only when the value changes), or record a
    /// histogram value.
    pub fn set<H: Host>(&mut self, h: &H, metric: Metric, labels: &[&str], value: u64) {
        let gauge = matches!(metric.kind, crate::metrics::Kind::Gauge);
        let Some(defined) = self.entry(h, metric, labels) else {
            return;
        };
        let Some(id) = defined.id else { return };
        if gauge && defined.value == Some(value) {
            return;
        }
        if h.record_metric(id, value).is_ok() && gauge {
            defined.value = Some(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::time::Duration;

    use super::*;
    use crate::metrics::{Kind, REQUESTS_AUTHORIZED, TOKEN_EXPIRES_IN};
    use crate::source::TokenRequest;
    use crate::store::memory::MemoryStore;
    use crate::worker::{Level, Status};

    /// A host that defines metrics and records every metric call.
    #[derive(Default)]
    struct Recorder {
        defined: RefCell<Vec<String>>,
        calls: RefCell<Vec<(u32, i64)>>,
    }

    impl Host for Recorder {
        type Store = MemoryStore;
        fn store(&self) -> MemoryStore {
            MemoryStore::default()
        }
        fn now_ms(&self) -> u64 {
            0
        }
        fn random_seed(&self) -> u64 {
            0
        }
        fn logs(&self, _: Level) -> bool {
            false
        }
        fn log(&self, _: Level, _: &str) {}
        fn register_queue(&self, _: &str) -> Result<u32, Status> {
            Err(Status(1))
        }
        fn enqueue(&self, _: u32, _: &[u8]) -> Result<(), Status> {
            Err(Status(1))
        }
        fn set_tick(&self, _: Duration) -> Result<(), Status> {
            Err(Status(1))
        }
        fn dispatch(&self, _: &TokenRequest) -> Result<u32, Status> {
            Err(Status(1))
        }
        fn define_metric(&self, _: Kind, name: &str) -> Result<u32, Status> {
            let mut defined = self.defined.borrow_mut();
            defined.push(name.to_owned());
            Ok(defined.len() as u32)
        }
        fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
            self.calls.borrow_mut().push((id, delta));
            Ok(())
        }
        fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
            self.calls.borrow_mut().push((id, value as i64));
            Ok(())
        }
        fn enter(&self, _: u32) -> Result<(), Status> {
            Err(Status(1))
        }
        fn leave(&self) {}
        fn routed_cluster(&self) -> Option<Vec<u8>> {
            None
        }
        fn set_request_header(&self, _: &str, _: &str) -> Result<(), Status> {
            Err(Status(1))
        }
        fn remove_request_header(&self, _: &str) -> Result<(), Status> {
            Err(Status(1))
        }
        fn resume_request(&self) -> Result<(), Status> {
            Err(Status(1))
        }
        fn send_local_reply(&self, _: u16, _: &[(&str, &str)], _: &str) -> Result<(), Status> {
            Err(Status(1))
        }
        fn response_header(&self, _: &str) -> Option<Vec<u8>> {
            None
        }
        fn set_response_header(&self, _: &str, _: Option<&str>) -> Result<(), Status> {
            Err(Status(1))
        }
        fn response_body(&self, _: usize) -> Vec<u8> {
            Vec::new()
        }
        fn replace_response_body(&self, _: usize, _: &[u8]) -> Result<(), Status> {
            Err(Status(1))
        }
    }

    #[test]
    fn each_metric_and_label_set_is_defined_once_and_reused() {
        let (host, mut metrics) = (Recorder::default(), Metrics::default());
        metrics.add(&host, REQUESTS_AUTHORIZED, &["chat", ""], 1);
        metrics.add(&host, REQUESTS_AUTHORIZED, &["chat", ""], 2);
        metrics.add(&host, REQUESTS_AUTHORIZED, &["embed", ""], 1);
        metrics.add(&host, REQUESTS_AUTHORIZED, &["chat", ""], 3);
        assert_eq!(
            *host.defined.borrow(),
            [
                "aoai_msi_requests_authorized_total;target=chat",
                "aoai_msi_requests_authorized_total;target=embed"
            ]
        );
        assert_eq!(*host.calls.borrow(), [(1, 1), (1, 2), (2, 1), (1, 3)]);
    }

    #[test]
    fn a_gauge_is_written_only_when_its_value_changes() {
        let (host, mut metrics) = (Recorder::default(), Metrics::default());
        for seconds in [3599, 3599, 3599, 3598, 3598, 0] {
            metrics.set(&host, TOKEN_EXPIRES_IN, &["chat"], seconds);
        }
        assert_eq!(*host.calls.borrow(), [(1, 3599), (1, 3598), (1, 0)]);
    }
}

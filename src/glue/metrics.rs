//! Metric ids, defined on first use. Defining the same name again in another
//! VM yields the same Envoy stat, so every worker adds to one counter.

use std::collections::HashMap;

use crate::metrics::Metric;

use super::host;

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, Option<u32>>,
}

impl Metrics {
    fn id(&mut self, metric: Metric, labels: &[&str]) -> Option<u32> {
        let name = metric.stat_name(labels);
        *self.ids.entry(name).or_insert_with_key(|name| {
            host::define_metric(metric.kind, name)
                .map_err(|status| log::warn!("cannot define metric {name}: {status:?}"))
                .ok()
        })
    }

    /// Add to a counter or gauge.
    pub fn add(&mut self, metric: Metric, labels: &[&str], delta: i64) {
        if let Some(id) = self.id(metric, labels) {
            let _ = host::increment_metric(id, delta);
        }
    }

    /// Set a gauge, or record a histogram value.
    pub fn set(&mut self, metric: Metric, labels: &[&str], value: u64) {
        if let Some(id) = self.id(metric, labels) {
            let _ = host::record_metric(id, value);
        }
    }
}

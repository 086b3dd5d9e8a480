//! Metric ids, defined on first use. Defining the same name again in another
//! worker yields the same Envoy stat, so every worker adds to one counter.

use std::collections::HashMap;

use super::host::{say, Host};
use crate::metrics::Metric;

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, Option<u32>>,
}

impl Metrics {
    fn id<H: Host>(&mut self, h: &H, metric: Metric, labels: &[&str]) -> Option<u32> {
        let name = metric.stat_name(labels);
        *self.ids.entry(name).or_insert_with_key(|name| {
            h.define_metric(metric.kind, name)
                .map_err(|status| say!(h, Warn, "cannot define metric {name}: {status:?}"))
                .ok()
        })
    }

    /// Add to a counter or gauge.
    pub fn add<H: Host>(&mut self, h: &H, metric: Metric, labels: &[&str], delta: i64) {
        if let Some(id) = self.id(h, metric, labels) {
            let _ = h.increment_metric(id, delta);
        }
    }

    /// Set a gauge, or record a histogram value.
    pub fn set<H: Host>(&mut self, h: &H, metric: Metric, labels: &[&str], value: u64) {
        if let Some(id) = self.id(h, metric, labels) {
            let _ = h.record_metric(id, value);
        }
    }
}

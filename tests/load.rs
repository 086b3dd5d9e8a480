//! A bounded load test on 127.0.0.1: 50 requests/s for 60 s through 4 Envoy
//! workers with 8-second tokens, while IMDS fails in every way it can,
//! including a 10-second outage. It stops by itself.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const RATE_PER_S: u64 = 50;
const RUN: Duration = Duration::from_secs(60);
const LIFETIME_S: u64 = 8;
const OUTAGE: (u64, u64) = (30, 40);

/// What IMDS does `s` seconds into the run.
fn imds_at(s: u64) -> Option<ImdsReply> {
    let slow = |then| ImdsReply::Slow {
        delay_ms: 1_500,
        then: Box::new(then),
    };
    match s {
        10..=13 => Some(ImdsReply::error(500, "server_error", "internal error")),
        14..=16 => Some(ImdsReply::error(429, "too_many_requests", "throttled")),
        17..=18 => Some(ImdsReply::error(410, "gone", "upgrading")),
        19..=21 => Some(slow(ImdsReply::error(500, "late", "late"))),
        s if (OUTAGE.0..OUTAGE.1).contains(&s) => Some(if s % 2 == 0 {
            ImdsReply::error(503, "service_unavailable", "outage")
        } else {
            slow(ImdsReply::error(503, "service_unavailable", "outage"))
        }),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_load_through_imds_failures_and_an_outage_loses_no_request_that_had_a_token() {
    let emulator = Arc::new(
        Emulator::start(Settings {
            token_lifetime_s: LIFETIME_S,
            ..Settings::default()
        })
        .unwrap(),
    );
    let envoy = Envoy::start(r#"{"token_source":{"timeout_ms":1000}}"#, &emulator, 4);
    let client = client();
    assert_eq!(
        chat(&client, &envoy, AOAI_HOST, "warm")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let results = Arc::new(Mutex::new(Vec::<(u64, u16, Duration)>::new()));
    let started = Instant::now();
    let start_ms = epoch_ms();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_S));
    let mut phase = None;
    while started.elapsed() < RUN {
        ticker.tick().await;
        let second = started.elapsed().as_secs();
        if phase != Some(second) {
            phase = Some(second);
            let reply = imds_at(second);
            emulator.configure(|s| s.imds_failure = reply);
        }
        let request = chat(&client, &envoy, AOAI_HOST, "load");
        let results = results.clone();
        in_flight.spawn(async move {
            let sent = epoch_ms();
            let t = Instant::now();
            let status = match request.send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            results.lock().unwrap().push((sent, status, t.elapsed()));
        });
    }
    emulator.configure(|s| s.imds_failure = None);
    while in_flight.join_next().await.is_some() {}

    let results = results.lock().unwrap().clone();
    let calls = emulator.imds_requests();
    // Each token answer makes a window in which a request could succeed:
    // from its arrival to expiry minus the margin (a quarter of 8 s).
    let windows: Vec<(u64, u64)> = calls
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| (c.at_ms, (c.at_ms / 1000 + LIFETIME_S) * 1000 - 2_000))
        .collect();
    let had_token = |t: u64| {
        windows
            .iter()
            .any(|(from, to)| *from + 50 <= t && t + 100 <= *to)
    };
    let failed: Vec<&(u64, u16, Duration)> = results.iter().filter(|r| r.1 != 200).collect();
    let lost: Vec<_> = failed.iter().filter(|r| had_token(r.0)).collect();
    let mut arrivals: Vec<u64> = calls.iter().map(|c| c.arrived_ms).collect();
    arrivals.sort();
    let max_rate = arrivals
        .iter()
        .map(|a| {
            arrivals
                .iter()
                .filter(|b| **b >= *a && **b < a + 1_000)
                .count()
        })
        .max()
        .unwrap_or(0);
    let outage_end = start_ms + OUTAGE.1 * 1000;
    let recovered_after = calls
        .iter()
        .filter(|c| c.status == 200 && c.at_ms >= outage_end)
        .map(|c| c.at_ms - outage_end)
        .min();
    let mut latencies: Vec<Duration> = results.iter().filter(|r| r.1 == 200).map(|r| r.2).collect();
    latencies.sort();
    println!(
        "load: {} requests in {RUN:?} ({RATE_PER_S}/s, 4 workers, {LIFETIME_S} s tokens): {} failed, {} of them while a token was valid; \
         IMDS calls {} ({} tokens), max IMDS concurrency {}, max IMDS rate {max_rate}/s, recovery {:?} ms after the outage; \
         p50 {:?}, p99 {:?}",
        results.len(),
        failed.len(),
        lost.len(),
        calls.len(),
        windows.len(),
        emulator.imds_max_concurrency(),
        recovered_after,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
    assert!(results.len() as u64 >= RATE_PER_S * RUN.as_secs() * 9 / 10);
    assert!(
        lost.is_empty(),
        "requests failed while a valid token existed: {lost:?}"
    );
    assert!(
        emulator.imds_max_concurrency() <= 5,
        "IMDS allows 5 concurrent calls per VM"
    );
    assert!(max_rate <= 20, "IMDS allows 20 calls/s per VM: {max_rate}");
    let recovered_after = recovered_after.expect("a token after the outage");
    // With requests waiting, retries come at least every URGENT_CAP (4 s); a
    // call may take its 1 s timeout; plus slack for a loaded 2-core machine.
    assert!(
        recovered_after <= 6_500,
        "recovery within the urgent backoff cap after the outage: {recovered_after} ms"
    );
    let upstream = emulator.upstream_requests();
    assert!(
        upstream.iter().all(|r| r.verdict == Verdict::Ok),
        "no expired or invalid token ever reached Azure OpenAI"
    );
}

//! `/metrics` in the Prometheus text format.
//!
//! Counters and histograms count what this replica did (sum them across replicas);
//! gauges of fleet state (droplets by status, open commands) are read from PostgreSQL at
//! scrape time, so every replica reports the same fleet-wide numbers (take one, or max).

use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub code: String,
}

/// This replica's instruments.
pub struct Metrics {
    registry: Registry,
    droplets: Family<StatusLabel, Gauge>,
    open_commands: Family<StateLabel, Gauge>,
    sessions_here: Gauge,
    commands_finished: Family<StateLabel, Counter>,
    round_trip: Histogram,
    enrollments: Family<ResultLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    flush_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_flush: Mutex<Option<Instant>>,
}

/// The process's metrics (one control plane per process outside tests; in tests several
/// share them, which only adds up their counts).
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("flotilla");
        let metrics = Self {
            droplets: Family::default(),
            open_commands: Family::default(),
            sessions_here: Gauge::default(),
            commands_finished: Family::default(),
            // 5 ms .. ~40 s.
            round_trip: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14)),
            enrollments: Family::default(),
            requests: Family::default(),
            flush_lag: Gauge::default(),
            last_flush: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register("droplets", "Droplets by status (fleet-wide, from the database)", metrics.droplets.clone());
        registry.register(
            "commands_open",
            "Commands not yet final, by state (fleet-wide, from the database)",
            metrics.open_commands.clone(),
        );
        registry.register("sessions", "Agent sessions held by this replica", metrics.sessions_here.clone());
        registry.register(
            "commands_finished",
            "Commands this replica saw reach a final state",
            metrics.commands_finished.clone(),
        );
        registry.register(
            "command_round_trip_seconds",
            "From a command's creation to its result, for commands finished here",
            metrics.round_trip.clone(),
        );
        registry.register("enrollments", "Enrollment attempts by result", metrics.enrollments.clone());
        registry.register(
            "api_requests",
            "Fleet API requests by route and code (gRPC status name or HTTP status)",
            metrics.requests.clone(),
        );
        registry.register(
            "heartbeat_flush_lag_seconds",
            "Time since this replica last wrote heartbeats to the database",
            metrics.flush_lag.clone(),
        );
        Self { registry, ..metrics }
    }

    pub fn command_finished(&self, state: &str, round_trip: Option<Duration>) {
        self.commands_finished.get_or_create(&StateLabel { state: state.to_owned() }).inc();
        if let Some(round_trip) = round_trip {
            self.round_trip.observe(round_trip.as_secs_f64());
        }
    }

    pub fn enrollment(&self, result: &str) {
        self.enrollments.get_or_create(&ResultLabel { result: result.to_owned() }).inc();
    }

    pub fn request(&self, route: &str, code: &str) {
        self.requests.get_or_create(&RequestLabels { route: route.to_owned(), code: code.to_owned() }).inc();
    }

    pub fn flushed(&self) {
        if let Ok(mut last) = self.last_flush.lock() {
            *last = Some(Instant::now());
        }
    }

    /// The text exposition, with the fleet-wide gauges as just read from the database:
    /// droplets by status and open commands by state.
    pub fn render(
        &self,
        droplets: Vec<(String, i64)>,
        open: &[(String, i64)],
        sessions_here: usize,
    ) -> Result<String, std::fmt::Error> {
        self.droplets.clear();
        for (status, n) in droplets {
            self.droplets.get_or_create(&StatusLabel { status }).set(n);
        }
        self.open_commands.clear();
        for state in ["queued", "sent", "acked"] {
            let n = open.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
            self.open_commands.get_or_create(&StateLabel { state: state.to_owned() }).set(n);
        }
        self.sessions_here.set(i64::try_from(sessions_here).unwrap_or(i64::MAX));
        let lag = self.last_flush.lock().ok().and_then(|last| *last).map_or(0.0, |at| at.elapsed().as_secs_f64());
        self.flush_lag.set(lag);
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

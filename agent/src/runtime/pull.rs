//! Docker's image pull stream, boiled down to a few progress lines worth an event.

/// Turns Docker's pull stream into a few lines worth an event: each layer once when it is
/// done, byte counts at most every [`PullReport::EVERY`], and the outcome.
#[derive(Default)]
pub(super) struct PullReport {
    layers: std::collections::BTreeMap<String, (u64, u64)>,
    done: usize,
    last: Option<std::time::Instant>,
    outcome: Option<String>,
}

impl PullReport {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);

    pub(super) fn step(
        &mut self,
        layer: Option<&str>,
        status: Option<&str>,
        detail: Option<bollard::models::ProgressDetail>,
    ) -> Option<String> {
        let status = status?;
        let Some(layer) = layer.filter(|l| l.len() == 12) else {
            // "Status: Downloaded newer image for …", "Digest: sha256:…".
            if status.starts_with("Status:") || status.starts_with("Digest:") {
                let outcome = self.outcome.get_or_insert_with(String::new);
                if !outcome.is_empty() {
                    outcome.push_str("; ");
                }
                outcome.push_str(status);
            }
            return None;
        };
        if status == "Pull complete" || status == "Already exists" {
            self.done += 1;
            return Some(format!("layer {layer}: {}", status.to_lowercase()));
        }
        if let Some(detail) = detail {
            let current = detail.current.and_then(|c| u64::try_from(c).ok()).unwrap_or(0);
            let total = detail.total.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
            self.layers.insert(layer.to_owned(), (current, total));
        }
        if status == "Downloading" && self.last.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            self.last = Some(std::time::Instant::now());
            let (current, total) = self.layers.values().fold((0, 0), |(c, t), (lc, lt)| (c + lc, t + lt));
            return Some(format!("downloading: {} of {} bytes", current, total));
        }
        None
    }

    pub(super) fn finished(&self, image: &str) -> String {
        let outcome = self.outcome.as_deref().unwrap_or("done");
        format!("pulled {image}: {outcome} ({} layers)", self.done)
    }
}

//! Per-request series kept once per worker and summed at scrape.
//!
//! Every proxied request adds to a dozen atomics (a counter, four histograms of four atomics
//! each). With one copy shared by every worker, two workers on two cores pass those cache lines
//! back and forth on every request: with two workers, recording nothing at all served 1.07x the
//! requests at 0.95x the CPU per request (`benches/load/abtest.sh`, 5 rounds), more than the
//! instructions involved explain. So each worker thread updates its own copy (its shard), and a
//! scrape adds the copies up: the families, names, labels and values a scrape shows are the same
//! as with one copy.
//!
//! A series is made on its first use in a shard and reached from then on with one atomic load:
//! a request never takes a lock or looks a label up.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{Histogram, HistogramOpts, IntCounter, Opts, Registry};

/// How many copies of each series there are. Workers beyond this share copies (worker `i` uses
/// shard `1 + i % (SHARDS - 1)`); every other thread uses shard 0.
const SHARDS: usize = 16;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread record into worker `worker`'s copies from now on.
pub fn use_worker_shard(worker: usize) {
    SHARD.set(1 + worker % (SHARDS - 1));
}

/// Makes one series for a list of label values.
type MakeSeries<M> = Box<dyn Fn(&[&str]) -> M + Send + Sync>;

/// One family whose series are made on first use, `n` of them per shard.
pub struct Sharded<M> {
    inner: Arc<Inner<M>>,
}

struct Inner<M> {
    desc: Desc,
    n: usize,
    make: MakeSeries<M>,
    cells: Box<[OnceLock<M>]>,
}

impl Sharded<IntCounter> {
    /// A counter family with these label names and room for `n` label combinations.
    pub fn counters(r: &Registry, name: &str, help: &str, labels: &[&str], n: usize) -> Self {
        let (name, help) = (name.to_owned(), help.to_owned());
        let names = owned(labels);
        let opts = Opts::new(name.clone(), help.clone());
        Sharded::register(r, &name, &help, labels, n, move |values| {
            let opts = opts.clone().const_labels(pairs(&names, values));
            IntCounter::with_opts(opts).expect("a valid metric")
        })
    }
}

impl Sharded<Histogram> {
    /// A histogram family with these label names, buckets and room for `n` label combinations.
    pub fn histograms(
        r: &Registry,
        name: &str,
        help: &str,
        labels: &[&str],
        n: usize,
        buckets: &[f64],
    ) -> Self {
        let names = owned(labels);
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        Sharded::register(r, name, help, labels, n, move |values| {
            let opts = opts.clone().const_labels(pairs(&names, values));
            Histogram::with_opts(opts).expect("a valid metric")
        })
    }
}

impl<M: Collector + 'static> Sharded<M> {
    fn register(
        r: &Registry,
        name: &str,
        help: &str,
        labels: &[&str],
        n: usize,
        make: impl Fn(&[&str]) -> M + Send + Sync + 'static,
    ) -> Self {
        let desc = Desc::new(name.into(), help.into(), owned(labels), HashMap::new())
            .expect("a valid metric");
        let inner = Arc::new(Inner {
            desc,
            n,
            make: Box::new(make),
            cells: (0..n * SHARDS).map(|_| OnceLock::new()).collect(),
        });
        r.register(Box::new(Summed(inner.clone())))
            .expect("a unique metric");
        Sharded { inner }
    }

    /// Series `i` (below `n`) of this thread's shard, made with `labels` on its first use.
    pub fn get<L: AsRef<str>, const N: usize>(
        &self,
        i: usize,
        labels: impl FnOnce() -> [L; N],
    ) -> &M {
        let inner = &*self.inner;
        inner.cells[SHARD.get() * inner.n + i].get_or_init(|| {
            let labels = labels();
            (inner.make)(&labels.each_ref().map(AsRef::as_ref))
        })
    }
}

/// The family as a scrape sees it: every shard's series with the same labels added up.
struct Summed<M>(Arc<Inner<M>>);

impl<M: Collector> Collector for Summed<M> {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut kind = MetricType::COUNTER;
        let mut by_labels: BTreeMap<Vec<(String, String)>, prometheus::proto::Metric> =
            BTreeMap::new();
        let families = self
            .0
            .cells
            .iter()
            .filter_map(OnceLock::get)
            .flat_map(M::collect);
        for family in families {
            kind = family.get_field_type();
            for metric in family.get_metric() {
                let key = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), l.value().to_owned()))
                    .collect();
                match by_labels.get_mut(&key) {
                    Some(sum) => add(kind, sum, metric),
                    None => {
                        by_labels.insert(key, metric.clone());
                    }
                }
            }
        }
        if by_labels.is_empty() {
            return Vec::new();
        }
        let mut family = MetricFamily::default();
        family.set_name(self.0.desc.fq_name.clone());
        family.set_help(self.0.desc.help.clone());
        family.set_field_type(kind);
        family.set_metric(by_labels.into_values().collect());
        vec![family]
    }
}

/// Adds `more` into `sum`: counters' values; histograms' counts, sums and buckets.
fn add(kind: MetricType, sum: &mut prometheus::proto::Metric, more: &prometheus::proto::Metric) {
    match kind {
        MetricType::COUNTER => {
            let mut c = sum.get_counter().clone();
            c.set_value(c.get_value() + more.get_counter().get_value());
            sum.set_counter(c);
        }
        MetricType::HISTOGRAM => {
            let (a, b) = (sum.get_histogram(), more.get_histogram());
            let mut h = a.clone();
            h.set_sample_count(a.get_sample_count() + b.get_sample_count());
            h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
            let buckets = a.get_bucket().iter().zip(b.get_bucket()).map(|(x, y)| {
                let mut x = x.clone();
                x.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                x
            });
            h.set_bucket(buckets.collect());
            sum.set_histogram(h);
        }
        // Only counters and histograms are sharded.
        _ => {}
    }
}

fn owned(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|l| (*l).to_owned()).collect()
}

fn pairs(names: &[String], values: &[&str]) -> HashMap<String, String> {
    names
        .iter()
        .cloned()
        .zip(values.iter().map(|v| (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_adds_up_every_shard() {
        let r = Registry::new();
        let c = Sharded::counters(&r, "t_total", "help", &["kind"], 2);
        let h = Sharded::histograms(&r, "t_seconds", "help", &["kind"], 1, &[0.1, 1.0]);
        std::thread::scope(|s| {
            for w in 0..3 {
                let (c, h) = (&c, &h);
                s.spawn(move || {
                    use_worker_shard(w);
                    c.get(0, || ["user"]).inc_by(w as u64 + 1);
                    c.get(1, || ["hub"]).inc();
                    h.get(0, || ["user"]).observe(0.5);
                });
            }
        });
        c.get(0, || ["user"]).inc(); // this thread: shard 0
        let text = {
            let mut out = Vec::new();
            prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut out)
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(text.contains("t_total{kind=\"user\"} 7\n"), "{text}");
        assert!(text.contains("t_total{kind=\"hub\"} 3\n"), "{text}");
        assert!(
            text.contains("t_seconds_bucket{kind=\"user\",le=\"0.1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{kind=\"user\",le=\"1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_count{kind=\"user\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_sum{kind=\"user\"} 1.5\n"),
            "{text}"
        );
    }

    #[test]
    fn a_family_nothing_used_is_not_scraped() {
        let r = Registry::new();
        let _c = Sharded::counters(&r, "unused_total", "help", &["kind"], 2);
        assert!(r.gather().is_empty());
    }
}

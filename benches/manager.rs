//! Criterion benchmarks of the manager, each beside its baseline:
//! `cargo bench`. The quick, one-command version of the same figures is
//! `cargo run --release --example bench -- --quick --json`.

use std::time::Duration;

use actix::prelude::*;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vram_manager::bench::{self, BareActor};

fn acquire(c: &mut Criterion) {
    let system = actix::System::new();
    let (manager, bare) = system.block_on(async {
        (
            bench::manager_with_resident_model().await,
            BareActor::default().start(),
        )
    });
    let mut group = c.benchmark_group("acquire_and_drop");
    group.bench_function("vram_actor", |b| {
        b.iter_custom(|iters| system.block_on(bench::acquire_round_trips(&manager.addr, iters)))
    });
    group.bench_function("bare_actor_baseline", |b| {
        b.iter_custom(|iters| system.block_on(bench::bare_round_trips(&bare, iters)))
    });
    group.finish();
}

fn load_with_evictions(c: &mut Criterion) {
    let system = actix::System::new();
    let mut group = c.benchmark_group("load_with_k_evictions");
    let plain = system.block_on(async { bench::eviction_manager(1) });
    group.bench_function("0_baseline", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += bench::timed_plain_load(&plain).await;
                }
                total
            })
        })
    });
    for k in [1u64, 4, 16] {
        let manager = system.block_on(async { bench::eviction_manager(k) });
        group.bench_with_input(BenchmarkId::from_parameter(k), &k, |b, &k| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += bench::timed_eviction_load(&manager, k).await;
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

fn status_during_load(c: &mut Criterion) {
    let system = actix::System::new();
    let (slow, idle) = system.block_on(async {
        (
            bench::slow_load_manager(),
            bench::manager_with_resident_model().await,
        )
    });
    let mut group = c.benchmark_group("status");
    group.bench_function("during_10s_load", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                bench::status_latencies_during_load(&slow, iters as usize)
                    .await
                    .into_iter()
                    .sum()
            })
        })
    });
    group.bench_function("idle_baseline", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    let _ = std::hint::black_box(idle.addr.send(vram_manager::Status).await);
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

fn planning(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    for n in [10usize, 100, 1_000, 10_000] {
        let fixture = bench::plan_fixture(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &fixture, |b, fixture| {
            b.iter(|| bench::plan_once(fixture))
        });
    }
    // Placement over 8 cards holding 64 models: an eviction planned on
    // every card, the cheapest chosen.
    let fixture = bench::place_fixture();
    group.bench_function("place_8_cards_64_models", |b| {
        b.iter(|| bench::place_once(&fixture, vram_manager::Order::Strict))
    });
    group.finish();
    // The adaptive order on the same fixtures (with their request
    // history): p_soon per candidate plus the capped cover.
    let mut group = c.benchmark_group("plan_adaptive");
    for n in [10usize, 100, 1_000] {
        let fixture = bench::plan_fixture(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &fixture, |b, fixture| {
            b.iter(|| bench::plan_once_in(fixture, vram_manager::Order::Adaptive))
        });
    }
    group.finish();
}

fn throughput(c: &mut Criterion) {
    let system = actix::System::new();
    let (clients, ops_each) = (64usize, 100usize);
    let mut group = c.benchmark_group("throughput");
    group.throughput(Throughput::Elements((clients * ops_each) as u64));
    group.bench_function("64_clients", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let per_sec = bench::throughput(clients, ops_each).await;
                    total += Duration::from_secs_f64((clients * ops_each) as f64 / per_sec);
                }
                total
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = acquire, load_with_evictions, status_during_load, planning, throughput
}
criterion_main!(benches);

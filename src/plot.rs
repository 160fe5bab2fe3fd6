//! A picture of a scenario run: VRAM use over the steps as one stacked band
//! per model, coloured by kind, with the capacity as a line and evictions
//! and failures marked and labelled; one panel per card. Written as SVG
//! with plotters.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use plotters::prelude::*;

use vram_manager::config::Settings;
use vram_manager::scenario::Report;

const GIB: f64 = (1u64 << 30) as f64;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    /// The file asked for.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Base colour of a kind; models of the kind get shades of it.
fn kind_colour(kind: &str) -> (u8, u8, u8) {
    match kind {
        "asr" => (52, 101, 164),
        "tts" => (78, 154, 6),
        "llm" => (206, 92, 0),
        _ => (117, 80, 123),
    }
}

/// The `i`th of `n` shades of `base`, from the colour itself towards white.
fn shade((r, g, b): (u8, u8, u8), i: usize, n: usize) -> RGBColor {
    let t = if n <= 1 {
        0.0
    } else {
        0.55 * i as f64 / (n - 1) as f64
    };
    let mix = |c: u8| (c as f64 + (255.0 - c as f64) * t).round() as u8;
    RGBColor(mix(r), mix(g), mix(b))
}

/// Draws `report` (a run of a scenario with `settings`) to `path` as SVG.
/// Step `n` is the span from `n - 0.5` to `n + 0.5`: what was resident
/// after it.
pub fn draw(
    report: &Report,
    settings: &Settings,
    title: &str,
    path: &Path,
) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    // Models bottom-up: highest priority (most protected) at the bottom.
    let mut models: Vec<(&str, &str, u32)> = settings
        .models
        .iter()
        .map(|m| {
            let priority = settings.kinds.get(&m.spec.kind).map_or(0, |k| k.priority);
            (m.spec.id.as_str(), m.spec.kind.as_str(), priority)
        })
        .collect();
    models.sort_by_key(|&(id, _, priority)| (std::cmp::Reverse(priority), id));
    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, kind, _) in &models {
        *per_kind.entry(kind).or_default() += 1;
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let colours: Vec<RGBColor> = models
        .iter()
        .map(|(_, kind, _)| {
            let i = seen.entry(kind).or_default();
            let colour = shade(kind_colour(kind), *i, per_kind[kind]);
            *i += 1;
            colour
        })
        .collect();

    let title: String = if title.chars().count() > 120 {
        title.chars().take(117).chain("...".chars()).collect()
    } else {
        title.to_string()
    };
    let cards = report.capacities.len().max(1);
    let height = if cards == 1 { 640 } else { 440 * cards as u32 };
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let panels = root.split_evenly((cards, 1));
    for (card, area) in panels.iter().enumerate() {
        let caption = if cards == 1 {
            title.clone()
        } else {
            format!("{title} (gpu {card})")
        };
        panel(area, report, &models, &colours, card, cards, &caption).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// One card's panel: its bands, its capacity, and the marks of the steps
/// whose model is on it.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
    models: &[(&str, &str, u32)],
    colours: &[RGBColor],
    card: usize,
    cards: usize,
    title: &str,
) -> Result<(), String> {
    let steps = report.steps.len().max(1);
    let capacity = if cards == 1 {
        report.capacity
    } else {
        report.capacities.get(card).copied().unwrap_or(0)
    } as f64
        / GIB;
    // This card's use after each step.
    let used_on = |step: &vram_manager::scenario::StepReport| {
        if cards == 1 {
            step.used
        } else {
            step.gpus.get(card).map_or(0, |g| g.used)
        }
    };
    let peak = report.steps.iter().map(used_on).max().unwrap_or(0) as f64 / GIB;
    let top = capacity.max(peak) * 1.25 + 0.5;

    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5f64..steps as f64 + 0.5, 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("step")
        .y_desc("VRAM (GiB)")
        .x_labels(steps.min(40))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .draw()
        .map_err(|e| e.to_string())?;

    // One band per model: a rectangle per step it is resident in, stacked
    // in the fixed order above. Each step is stacked once (its charged
    // models sorted into that order), so the work grows with steps times
    // resident models, not with the square of the catalog.
    let order: HashMap<&str, usize> = models
        .iter()
        .enumerate()
        .map(|(i, (id, _, _))| (*id, i))
        .collect();
    let mut bands: Vec<Vec<Rectangle<(f64, f64)>>> = models.iter().map(|_| Vec::new()).collect();
    let mut here: Vec<(usize, u64)> = Vec::new();
    for (i, step) in report.steps.iter().enumerate() {
        here.clear();
        here.extend(
            step.charged
                .iter()
                .filter(|(_, _, gpu)| cards == 1 || *gpu == card)
                .filter_map(|(m, bytes, _)| order.get(m.as_str()).map(|&at| (at, *bytes))),
        );
        // Stable, so a model charged twice keeps its first entry.
        here.sort_by_key(|&(at, _)| at);
        here.dedup_by_key(|&mut (at, _)| at);
        let mut below = 0u64;
        for &(at, bytes) in &here {
            let (lo, hi) = (below as f64 / GIB, (below + bytes) as f64 / GIB);
            let (x0, x1) = (i as f64 + 0.5, i as f64 + 1.5);
            bands[at].push(Rectangle::new([(x0, lo), (x1, hi)], colours[at].filled()));
            bands[at].push(Rectangle::new([(x0, lo), (x1, hi)], WHITE.stroke_width(1)));
            below += bytes;
        }
    }
    for (((id, _, _), colour), rects) in models.iter().zip(colours).zip(bands) {
        let colour = *colour;
        chart
            .draw_series(rects)
            .map_err(|e| e.to_string())?
            .label(*id)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
    }

    // Capacity.
    let red = RGBColor(204, 0, 0);
    chart
        .draw_series(LineSeries::new(
            [(0.5, capacity), (steps as f64 + 0.5, capacity)],
            red.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?
        .label(format!("capacity {:.1} GiB", capacity))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], red.stroke_width(2)));

    // Evictions and failures, marked above the bars and labelled.
    for (i, step) in report.steps.iter().enumerate() {
        // A step's marks go on the panel of its model's card (the first
        // when it is on none).
        if cards > 1 && step.gpu.unwrap_or(0) != card {
            continue;
        }
        let x = i as f64 + 1.0;
        let y = used_on(step) as f64 / GIB;
        if !step.evicted.is_empty() {
            let label = format!("evicted {}", step.evicted.join(", "));
            chart
                .draw_series([TriangleMarker::new((x, y + 0.35), 6, BLACK.filled())])
                .map_err(|e| e.to_string())?;
            chart
                .draw_series([Text::new(
                    label,
                    (x - 0.45, y + 0.9 + 0.45 * (i % 2) as f64),
                    ("sans-serif", 11),
                )])
                .map_err(|e| e.to_string())?;
        }
        if step.result != "ok" {
            chart
                .draw_series([Cross::new((x, y + 0.35), 6, red.stroke_width(2))])
                .map_err(|e| e.to_string())?;
            let label = format!(
                "{} {}",
                step.model.as_deref().unwrap_or(step.op),
                step.result
            );
            chart
                .draw_series([Text::new(
                    label,
                    (x - 0.45, y + 1.35 + 0.45 * (i % 2) as f64),
                    ("sans-serif", 11).into_font().color(&red),
                )])
                .map_err(|e| e.to_string())?;
        }
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

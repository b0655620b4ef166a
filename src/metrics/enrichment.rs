//! Folds of enrichment (CP-CNN paper; DeepProfilerExperiments `quality.enrichment_analysis`): per
//! query, the library items above the `percentile` of its similarities against those at or below,
//! crossed with same / different annotation, scored by the odds ratio and a one-sided Fisher exact
//! test; averaged over queries. The cytominer-eval variant uses one threshold over all pairs.

use super::pvalues::{fisher_exact_greater, odds_ratio, odds_ratio_haldane, Table2x2};
use super::retrieval::{check_items, QuerySet, Unlabeled};
use super::similarity::{
    check_percentile, percentile_linear, CosineSimilarity, PairStream, Progress,
};
use super::Labels;
use crate::error::Result;

/// What an infinite or undefined odds ratio (scipy: v12·v21 = 0 gives inf, an empty row or column
/// NaN) is reported as. Finite odds ratios are always reported as scipy computes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InfiniteOdds {
    /// Haldane–Anscombe: (v11+½)(v22+½) / ((v12+½)(v21+½)), finite for every table.
    #[default]
    Haldane,
    /// DeepProfilerExperiments: an infinite odds ratio becomes v22 (NaN stays NaN).
    DeepProfiler,
    /// scipy's values unchanged (inf and NaN enter the mean).
    Keep,
}

impl InfiniteOdds {
    /// The odds ratio of `t` under this convention.
    pub fn odds_ratio(self, t: &Table2x2) -> f64 {
        let or = odds_ratio(t);
        if or.is_finite() {
            return or;
        }
        match self {
            InfiniteOdds::Haldane => odds_ratio_haldane(t),
            InfiniteOdds::DeepProfiler if or.is_infinite() => t[1][1] as f64,
            _ => or,
        }
    }
}

/// Options of `folds_of_enrichment`.
#[derive(Clone, Debug)]
pub struct EnrichmentOptions {
    /// Percentile of the similarities that separates "above" (default 99, numpy linear).
    pub percentile: f64,
    pub infinite_odds: InfiniteOdds,
    /// Minimum positives for a query; 0 = 1.
    pub min_positives: usize,
    pub unlabeled: Unlabeled,
    pub block_rows: usize,
}

impl Default for EnrichmentOptions {
    fn default() -> Self {
        EnrichmentOptions {
            percentile: 99.0,
            infinite_odds: InfiniteOdds::Haldane,
            min_positives: 0,
            unlabeled: Unlabeled::Negatives,
            block_rows: 0,
        }
    }
}

/// Per-query folds of enrichment. Per-item vectors have one entry per item (NaN / zero table for
/// non-queries).
#[derive(Clone, Debug)]
pub struct EnrichmentResult {
    /// Mean odds ratio over the queries.
    pub mean_odds_ratio: f64,
    pub odds_ratio: Vec<f64>,
    pub p_value: Vec<f64>,
    pub threshold: Vec<f64>,
    /// `[[v11, v12], [v21, v22]]`: above / at-or-below × same / different annotation.
    pub table: Vec<Table2x2>,
    pub is_query: Vec<bool>,
    pub n_queries: usize,
}

/// Folds of enrichment with a per-query threshold (the CP-CNN paper's definition).
pub fn folds_of_enrichment(
    sim: &CosineSimilarity,
    labels: &Labels,
    opts: &EnrichmentOptions,
    mut progress: Progress,
) -> Result<EnrichmentResult> {
    check_items(sim, labels)?;
    check_percentile(opts.percentile, "percentile")?;
    let set = QuerySet::new(labels, opts.unlabeled, opts.min_positives.max(1))?;
    let n = sim.n();
    let mut threshold = vec![f64::NAN; n];
    let mut table = vec![[[0u64; 2]; 2]; n];
    sim.for_each_block(
        &set.queries,
        opts.block_rows,
        &mut progress,
        0,
        set.queries.len(),
        |blk, sims| {
            let mut marks = vec![0u32; n];
            let mut pos = Vec::new();
            let mut library = Vec::with_capacity(n);
            let mut out = Vec::with_capacity(blk.len());
            for (i, &q) in blk.iter().enumerate() {
                let row = &sims[i * n..(i + 1) * n];
                set.positives(labels, q, &mut marks, &mut pos);
                library.clear();
                library.extend(
                    (0..n)
                        .filter(|&j| j != q && set.in_library[j])
                        .map(|j| row[j]),
                );
                let t = percentile_linear(&mut library, opts.percentile);
                let stamp = q as u32 + 1;
                let mut tab = [[0u64; 2]; 2];
                for j in (0..n).filter(|&j| j != q && set.in_library[j]) {
                    let above = (row[j] <= t) as usize; // row 0 = above
                    let other = (marks[j] != stamp) as usize; // column 0 = same annotation
                    tab[above][other] += 1;
                }
                out.push((q, t, tab));
            }
            out
        },
        |rows| {
            for (q, t, tab) in rows {
                threshold[q] = t;
                table[q] = tab;
            }
        },
    )?;
    let mut odds = vec![f64::NAN; n];
    let mut p_value = vec![f64::NAN; n];
    for &q in &set.queries {
        odds[q] = opts.infinite_odds.odds_ratio(&table[q]);
        p_value[q] = fisher_exact_greater(&table[q]);
    }
    let nq = set.queries.len();
    Ok(EnrichmentResult {
        mean_odds_ratio: set.queries.iter().map(|&q| odds[q]).sum::<f64>() / nq as f64,
        odds_ratio: odds,
        p_value,
        threshold,
        table,
        is_query: set.is_query,
        n_queries: nq,
    })
}

/// Folds of enrichment with one threshold over all (query, library item) pairs, as cytominer-eval's
/// `enrichment` (it pools the full similarity matrix without its diagonal, each pair in both
/// orders, which is this when every item is a query).
#[derive(Clone, Debug, PartialEq)]
pub struct PooledEnrichment {
    pub threshold: f64,
    pub table: Table2x2,
    pub odds_ratio: f64,
    pub p_value: f64,
}

/// The global-threshold variant (see `PooledEnrichment`). Exact in memory O(block × N).
pub fn folds_of_enrichment_pooled(
    sim: &CosineSimilarity,
    labels: &Labels,
    opts: &EnrichmentOptions,
    mut progress: Progress,
) -> Result<PooledEnrichment> {
    check_items(sim, labels)?;
    check_percentile(opts.percentile, "percentile")?;
    let set = QuerySet::new(labels, opts.unlabeled, opts.min_positives.max(1))?;
    let stream = PairStream {
        sim,
        rows: &set.queries,
        block_rows: opts.block_rows,
        visit: |q: usize, row: &[f64], emit: &mut dyn FnMut(f64, usize)| {
            // Same-annotation flags for this row, from the labels directly (no shared scratch).
            for (j, &s) in row.iter().enumerate() {
                if j != q && set.in_library[j] {
                    emit(s, labels.share(q, j) as usize);
                }
            }
        },
    };
    let expected = set.queries.len() as u64 * set.library_size() as u64;
    let (threshold, c) =
        stream.percentile_and_counts([true, true], opts.percentile, expected, &mut progress)?;
    let table = [
        [c.above[1], c.above[0]],
        [c.at_or_below[1], c.at_or_below[0]],
    ];
    Ok(PooledEnrichment {
        threshold,
        odds_ratio: opts.infinite_odds.odds_ratio(&table),
        p_value: fisher_exact_greater(&table),
        table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_query_table_and_conventions() {
        // 2-D unit vectors: query 0 at angle 0, others at increasing angles.
        let angles = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.7];
        let x: Vec<f64> = angles
            .iter()
            .flat_map(|a: &f64| [a.cos(), a.sin()])
            .collect();
        let s = CosineSimilarity::new(&x, 8, 2).unwrap();
        let labels = Labels::from_joined(&["a", "a", "b", "b", "", "c", "c", "a"]);
        let opts = EnrichmentOptions {
            percentile: 50.0,
            ..Default::default()
        };
        let r = folds_of_enrichment(&s, &labels, &opts, None).unwrap();
        // query 0: library sims descending items 1..7; median of 7 values = item 4's; above =
        // items 1, 2, 3 → v11 = 1 (item 1), v12 = 2, v21 = 1 (item 7), v22 = 3.
        assert_eq!(r.table[0], [[1, 2], [1, 3]]);
        assert!((r.odds_ratio[0] - 1.5).abs() < 1e-15);
        assert!(r.odds_ratio[4].is_nan() && !r.is_query[4]);
        // query 1: above = items 0, 2, 3 (ties impossible) → v11 = 1, v12 = 2, v21 = 1 (7), v22 = 3
        assert_eq!(r.table[1], [[1, 2], [1, 3]]);
        // An infinite odds ratio: query 5 (c) has item 6 right next to it and nothing else.
        let r = folds_of_enrichment(
            &s,
            &labels,
            &EnrichmentOptions {
                percentile: 90.0,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(r.table[5], [[1, 0], [0, 6]]);
        assert_eq!(r.odds_ratio[5], 1.5 * 6.5 / (0.5 * 0.5));
        let dp = EnrichmentOptions {
            percentile: 90.0,
            infinite_odds: InfiniteOdds::DeepProfiler,
            ..Default::default()
        };
        assert_eq!(
            folds_of_enrichment(&s, &labels, &dp, None)
                .unwrap()
                .odds_ratio[5],
            6.0
        );
        // P(X ≥ 1) with one white among 7 and one drawn = 1/7
        assert!((r.p_value[5] - 1.0 / 7.0).abs() < 1e-15);
    }

    #[test]
    fn pooled_matches_per_row_counts() {
        let angles = [0.0, 0.13, 0.21, 0.38, 0.4, 0.52, 0.66, 0.71, 1.0, 1.3];
        let x: Vec<f64> = angles
            .iter()
            .flat_map(|a: &f64| [a.cos(), a.sin()])
            .collect();
        let s = CosineSimilarity::new(&x, 10, 2).unwrap();
        let labels = Labels::from_joined(&["a", "a|b", "b", "b", "c", "c", "a", "c", "b", "a"]);
        let r = folds_of_enrichment_pooled(
            &s,
            &labels,
            &EnrichmentOptions {
                percentile: 80.0,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let u = s.unit_rows();
        let mut all = Vec::new();
        for i in 0..10 {
            for j in 0..10 {
                if i != j {
                    all.push((
                        u[2 * i] * u[2 * j] + u[2 * i + 1] * u[2 * j + 1],
                        labels.share(i, j),
                    ));
                }
            }
        }
        let mut v: Vec<f64> = all.iter().map(|p| p.0).collect();
        let t = percentile_linear(&mut v, 80.0);
        assert!((r.threshold - t).abs() < 1e-15);
        let count = |above: bool, same: bool| {
            all.iter()
                .filter(|p| (p.0 > t) == above && p.1 == same)
                .count() as u64
        };
        assert_eq!(
            r.table,
            [
                [count(true, true), count(true, false)],
                [count(false, true), count(false, false)]
            ]
        );
    }
}

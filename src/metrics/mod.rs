//! Scoring profiles: retrieval (mAP, folds of enrichment, precision@k), classification metrics
//! (sklearn-style AP, ROC-AUC), subprofiles and Biosimilarity, and the statistics around them.

pub mod classification;
pub mod enrichment;
pub mod pvalues;
pub mod retrieval;
pub mod similarity;
pub mod stats;
pub mod subprofile;

use crate::io::profiles::split_labels;
use std::collections::HashMap;

/// Multi-label annotations of `n` items, interned: `items[i]` holds the sorted, de-duplicated
/// label ids of item `i` (possibly none); `names[id]` is the label's text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Labels {
    pub names: Vec<String>,
    pub items: Vec<Vec<u32>>,
}

impl Labels {
    /// From one `|`-joined cell per item (`"a|b"`, `""` for none).
    pub fn from_joined<S: AsRef<str>>(cells: &[S]) -> Labels {
        let lists: Vec<Vec<String>> = cells.iter().map(|c| split_labels(c.as_ref())).collect();
        Labels::from_lists(&lists)
    }

    /// From one list of labels per item.
    pub fn from_lists<S: AsRef<str>>(lists: &[Vec<S>]) -> Labels {
        let mut ids: HashMap<String, u32> = HashMap::new();
        let mut names = Vec::new();
        let items = lists
            .iter()
            .map(|list| {
                let mut v: Vec<u32> = list
                    .iter()
                    .map(|s| {
                        let s = s.as_ref();
                        *ids.entry(s.to_string()).or_insert_with(|| {
                            names.push(s.to_string());
                            (names.len() - 1) as u32
                        })
                    })
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();
        Labels { names, items }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether items `i` and `j` share at least one label.
    pub fn share(&self, i: usize, j: usize) -> bool {
        let (a, b) = (&self.items[i], &self.items[j]);
        let (mut x, mut y) = (0, 0);
        while x < a.len() && y < b.len() {
            match a[x].cmp(&b[y]) {
                std::cmp::Ordering::Equal => return true,
                std::cmp::Ordering::Less => x += 1,
                std::cmp::Ordering::Greater => y += 1,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_split_intern_and_share() {
        let l = Labels::from_joined(&["a|b", "", "b", " c | a |a", "d"]);
        assert_eq!(l.names, vec!["a", "b", "c", "d"]);
        assert_eq!(
            l.items,
            vec![vec![0, 1], vec![], vec![1], vec![0, 2], vec![3]]
        );
        assert!(l.share(0, 2) && l.share(0, 3) && !l.share(2, 3) && !l.share(1, 0));
        assert!(!l.share(4, 0));
    }
}

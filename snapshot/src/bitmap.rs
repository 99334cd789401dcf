//! Dirty-page bitmaps: which 4 KiB pages of a memory region changed since the last snapshot.
//!
//! The layout is KVM's (`KVM_GET_DIRTY_LOG`) and vm-memory's: a `Vec<u64>`, bit `i % 64` of word
//! `i / 64` set when page `i` is dirty. The VMM ORs together what KVM reports (vCPU writes) and
//! what vm-memory tracked (device writes) with [`PageBitmap::merge`], then writes the pages of
//! [`PageBitmap::byte_ranges`] to a diff memory file.

use std::ops::Range;

/// The page size dirty bitmaps count in.
pub const PAGE_SIZE: u64 = 4096;

/// Why two bitmaps cannot be merged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    /// The bitmaps cover regions of different sizes.
    #[error("cannot merge dirty bitmaps of different lengths: {left} and {right} words")]
    LengthMismatch {
        /// Words in the bitmap merged into.
        left: usize,
        /// Words in the bitmap merged from.
        right: usize,
    },
}

/// A dirty bitmap over one memory region, page `i` dirty when bit `i % 64` of word `i / 64` is
/// set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageBitmap {
    words: Vec<u64>,
}

impl PageBitmap {
    /// Wraps a bitmap as KVM or vm-memory hands it out.
    pub fn new(words: Vec<u64>) -> Self {
        PageBitmap { words }
    }

    /// A clean bitmap covering `pages` pages (rounded up to whole words).
    pub fn clean(pages: u64) -> Self {
        PageBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// How many pages the bitmap covers (a multiple of 64).
    pub fn pages(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Whether `page` is dirty; pages past the end are clean.
    pub fn is_dirty(&self, page: u64) -> bool {
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Marks `page` dirty; pages past the end are ignored (they are outside the region).
    pub fn set_dirty(&mut self, page: u64) {
        if let Some(w) = self.words.get_mut((page / 64) as usize) {
            *w |= 1 << (page % 64);
        }
    }

    /// Marks the pages `pages` dirty; those past the end are ignored.
    pub fn set_range(&mut self, pages: Range<u64>) {
        let end = pages.end.min(self.pages());
        let mut page = pages.start;
        while page < end {
            let (word, bit) = ((page / 64) as usize, page % 64);
            let run = (64 - bit).min(end - page);
            let mask = if run == 64 {
                u64::MAX
            } else {
                ((1u64 << run) - 1) << bit
            };
            self.words[word] |= mask;
            page += run;
        }
    }

    /// Clears every page `other` marks: afterwards a page is dirty if it was here and is not
    /// there. Pages past the end of `other` stay as they are.
    pub fn subtract(&mut self, other: &PageBitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// How many pages are dirty.
    pub fn dirty_pages(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` into this bitmap: a page is dirty if either says so. Both must cover the same
    /// region, so their lengths must agree.
    pub fn merge(&mut self, other: &PageBitmap) -> Result<(), BitmapError> {
        if self.words.len() != other.words.len() {
            return Err(BitmapError::LengthMismatch {
                left: self.words.len(),
                right: other.words.len(),
            });
        }
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        Ok(())
    }

    /// The dirty pages as byte ranges from the region's start, in order, adjacent pages
    /// coalesced into one range.
    pub fn byte_ranges(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for (index, &word) in self.words.iter().enumerate() {
            let base = index as u64 * 64;
            let mut rest = word;
            while rest != 0 {
                let first = u64::from(rest.trailing_zeros());
                let run = u64::from((rest >> first).trailing_ones());
                let start = (base + first) * PAGE_SIZE;
                let end = (base + first + run) * PAGE_SIZE;
                match ranges.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => ranges.push(start..end),
                }
                // Clear the bits taken; a run that reached the top bit took the whole word.
                let taken = first + run;
                rest = if taken >= 64 {
                    0
                } else {
                    rest & (u64::MAX << taken)
                };
            }
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn empty_and_clean_bitmaps_have_no_ranges() {
        assert!(PageBitmap::default().byte_ranges().is_empty());
        let clean = PageBitmap::clean(100);
        assert_eq!(clean.pages(), 128);
        assert!(clean.byte_ranges().is_empty());
        assert_eq!(clean.dirty_pages(), 0);
    }

    #[test]
    fn single_pages_and_runs_become_ranges() {
        let bm = PageBitmap::new(vec![0b1011_0001]);
        assert_eq!(bm.byte_ranges(), vec![0..P, 4 * P..6 * P, 7 * P..8 * P]);
        assert_eq!(bm.dirty_pages(), 4);
        assert!(bm.is_dirty(5) && !bm.is_dirty(6) && !bm.is_dirty(1000));
    }

    #[test]
    fn runs_coalesce_across_word_boundaries() {
        // Pages 62..=65 are dirty: the top two bits of word 0 and the bottom two of word 1.
        let bm = PageBitmap::new(vec![0b11 << 62, 0b11]);
        assert_eq!(bm.byte_ranges(), vec![62 * P..66 * P]);

        // Whole words in a row make one range; a clean word breaks it.
        let bm = PageBitmap::new(vec![u64::MAX, u64::MAX, 0, u64::MAX]);
        assert_eq!(bm.byte_ranges(), vec![0..128 * P, 192 * P..256 * P]);
    }

    #[test]
    fn top_bit_alone_and_alternating_bits() {
        let bm = PageBitmap::new(vec![1 << 63]);
        assert_eq!(bm.byte_ranges(), vec![63 * P..64 * P]);

        let bm = PageBitmap::new(vec![0x5555_5555_5555_5555]);
        let ranges = bm.byte_ranges();
        assert_eq!(ranges.len(), 32);
        assert!(
            ranges
                .iter()
                .all(|r| r.end - r.start == P && r.start % (2 * P) == 0)
        );
    }

    #[test]
    fn ranges_match_page_by_page() {
        // A pseudo-random bitmap checked against the obvious page-by-page answer.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let words: Vec<u64> = (0..16)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect();
        let bm = PageBitmap::new(words);
        let mut pages = Vec::new();
        for r in bm.byte_ranges() {
            pages.extend((r.start / P)..(r.end / P));
        }
        let expected: Vec<u64> = (0..bm.pages()).filter(|&p| bm.is_dirty(p)).collect();
        assert_eq!(pages, expected);
    }

    #[test]
    fn merge_ors_the_bitmaps() {
        let mut kvm = PageBitmap::new(vec![0b0011, 0]);
        let mut devices = PageBitmap::clean(128);
        devices.set_dirty(2);
        devices.set_dirty(64);
        devices.set_dirty(1_000_000);
        kvm.merge(&devices).unwrap();
        assert_eq!(kvm.words(), &[0b0111, 1]);
        assert_eq!(kvm.byte_ranges(), vec![0..3 * P, 64 * P..65 * P]);
    }

    #[test]
    fn ranges_are_set_across_words_and_subtracted() {
        let mut bm = PageBitmap::clean(256);
        bm.set_range(60..130);
        bm.set_range(200..1000);
        assert_eq!(bm.byte_ranges(), vec![60 * P..130 * P, 200 * P..256 * P]);
        bm.set_range(0..64);
        assert_eq!(bm.words()[0], u64::MAX);
        let mut other = PageBitmap::clean(128);
        other.set_range(100..128);
        bm.subtract(&other);
        assert_eq!(
            bm.byte_ranges(),
            vec![0..100 * P, 128 * P..130 * P, 200 * P..256 * P],
            "pages past the shorter bitmap stay"
        );
        assert_eq!(bm.dirty_pages(), 158);
    }

    #[test]
    fn merge_refuses_different_lengths_and_changes_nothing() {
        let mut a = PageBitmap::new(vec![1, 2]);
        let err = a.merge(&PageBitmap::new(vec![4])).unwrap_err();
        assert_eq!(err, BitmapError::LengthMismatch { left: 2, right: 1 });
        assert!(err.to_string().contains("2 and 1 words"));
        assert_eq!(a.words(), &[1, 2]);
    }
}

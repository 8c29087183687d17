//! Address translation over many pinned regions (being written).

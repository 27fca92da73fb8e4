//! Region bitmaps and the dirty log (placeholder).

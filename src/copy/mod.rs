//! Copy engine (placeholder).

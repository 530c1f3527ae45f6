//! Fuzz targets' shared checks; the stable corpus replay test includes the same file.

pub mod checks;

//! Watching files by polling their metadata: robust on every filesystem and with the
//! symlink swaps Kubernetes uses for mounted secrets and config maps.

use std::path::Path;
use std::time::SystemTime;

/// What identifies a version of a set of files: size and modification time of each
/// (following symlinks), or `None` for a file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Vec<Option<(u64, SystemTime)>>);

impl FileStamp {
    /// The current stamp of `paths`.
    pub fn of(paths: &[&Path]) -> Self {
        FileStamp(
            paths
                .iter()
                .map(|path| {
                    let meta = std::fs::metadata(path).ok()?;
                    Some((meta.len(), meta.modified().ok()?))
                })
                .collect(),
        )
    }
}

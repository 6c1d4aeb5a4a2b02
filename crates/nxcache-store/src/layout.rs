//! Where things live inside the data directory.

use std::path::{Path, PathBuf};

use crate::key::BlobKey;

#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_path_buf(),
        }
    }

    /// Committed blobs: `blobs/<shard>/<key>`.
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn shard_dir(&self, shard: u8) -> PathBuf {
        self.blobs_dir().join(format!("{shard:02x}"))
    }

    pub fn blob_path(&self, key: &BlobKey) -> PathBuf {
        self.shard_dir(key.shard()).join(key.as_str())
    }

    /// An upload in progress: a hidden file beside its final place, so the rename stays
    /// in one directory and concurrent uploads do not contend on one directory's lock.
    /// The leading dot makes it an invalid key: start-up reconciliation removes leftovers.
    pub fn temp_path(&self, key: &BlobKey, unique: &str) -> PathBuf {
        self.shard_dir(key.shard())
            .join(format!(".{}.{unique}.tmp", key.as_str()))
    }

    /// Scratch space (the readiness probe); emptied at start-up.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn index_dir(&self) -> PathBuf {
        self.root.join("index")
    }

    /// Present only while the store is closed cleanly; its absence at start-up means the
    /// last run crashed and the files must be reconciled with the index.
    pub fn clean_marker(&self) -> PathBuf {
        self.root.join("CLEAN_SHUTDOWN")
    }
}

/// Creates `path` and its missing parents readable by the server's user only (0700 on
/// Unix): artifacts are build outputs, and the data dir also holds tokens and the cluster
/// secret. A directory that exists keeps its mode (an operator may have chosen it).
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(path)
}

//! Flushing sled trees from async code.
//!
//! sled 0.34's `flush_async` can miss its wake-up when several flushes are in flight
//! (spacejam/sled#1308, #1357: fixed on sled's main branch, never released), which left
//! Raft storage calls, and so the whole node, waiting forever. The blocking `flush` has no
//! such bug; it runs on tokio's blocking pool so it never stalls a runtime worker.

use std::io;

/// Writes everything inserted into `tree` so far to disk before returning.
pub(crate) async fn flush(tree: &sled::Tree) -> io::Result<()> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush())
        .await
        .map_err(io::Error::other)?
        .map(|_| ())
        .map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many concurrent flushes of one tree, from two runtimes, all complete (the pattern
    /// that hangs `flush_async`).
    #[test]
    fn concurrent_flushes_from_several_runtimes_complete() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let tree = db.open_tree("t").unwrap();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let tasks: Vec<_> = (0..50u8)
                            .map(|i| {
                                let tree = tree.clone();
                                tokio::spawn(async move {
                                    tree.insert([t, i], vec![i]).unwrap();
                                    flush(&tree).await.unwrap();
                                })
                            })
                            .collect();
                        for task in tasks {
                            tokio::time::timeout(std::time::Duration::from_secs(30), task)
                                .await
                                .expect("a flush never completed")
                                .unwrap();
                        }
                    });
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(db.open_tree("t").unwrap().len(), 200);
    }
}

//! Snapshots of the metadata state as files.
//!
//! A snapshot is the state machine's tree, key by key, written to a file: built from a
//! copy of the tree taken between two applied batches, sent to a peer in chunks read from
//! the file, received straight into a file, and installed by reading the file record by
//! record. No step holds more than one copy of the state in memory, whatever its size.
//!
//! Format: the magic line, then records `[key length: u32 BE][key][value length: u32
//! BE][value]`, then `[u32::MAX][record count: u64 BE]`. A file cut short, or with bytes
//! after its end marker, is refused.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

const MAGIC: &[u8] = b"nxcache-meta-snapshot/1\n";
const END: u32 = u32::MAX;

/// openraft's handle on a snapshot: a file, and where it is (to keep it once installed).
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    /// Opens `path` for reading (a snapshot to send).
    pub(crate) async fn open(path: &Path) -> io::Result<Self> {
        Ok(SnapshotFile {
            file: tokio::fs::File::open(path).await?,
            path: path.to_path_buf(),
        })
    }

    /// Creates an empty file at `path` to receive a snapshot into.
    pub(crate) async fn create(path: &Path) -> io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .await?;
        Ok(SnapshotFile {
            file,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes what was received through to the disk.
    pub(crate) async fn sync(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.get_mut().file).start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.get_mut().file).poll_complete(cx)
    }
}

/// Writes `records` to a new file at `path` and syncs it; returns its size. Blocking.
pub(crate) fn write_file<K, V>(
    path: &Path,
    records: impl IntoIterator<Item = (K, V)>,
) -> io::Result<u64>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let file = std::fs::File::create(path)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(MAGIC)?;
    let mut count: u64 = 0;
    let mut size = MAGIC.len() as u64;
    for (key, value) in records {
        for part in [key.as_ref(), value.as_ref()] {
            let len = u32::try_from(part.len())
                .ok()
                .filter(|l| *l != END)
                .ok_or_else(|| io::Error::other("a snapshot record is over 4 GiB"))?;
            out.write_all(&len.to_be_bytes())?;
            out.write_all(part)?;
            size += 4 + part.len() as u64;
        }
        count += 1;
    }
    out.write_all(&END.to_be_bytes())?;
    out.write_all(&count.to_be_bytes())?;
    size += 12;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(size)
}

/// Reads a snapshot file record by record. Blocking.
pub(crate) struct RecordReader {
    input: BufReader<std::fs::File>,
    count: u64,
    done: bool,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl RecordReader {
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let mut input = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
        let mut magic = vec![0; MAGIC.len()];
        input
            .read_exact(&mut magic)
            .map_err(|_| invalid("not a metadata snapshot: too short"))?;
        if magic != MAGIC {
            return Err(invalid("not a metadata snapshot (unknown format)"));
        }
        Ok(RecordReader {
            input,
            count: 0,
            done: false,
        })
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut raw = [0; 4];
        self.input
            .read_exact(&mut raw)
            .map_err(|_| invalid("the snapshot is cut short"))?;
        Ok(u32::from_be_bytes(raw))
    }

    fn read_part(&mut self, len: u32) -> io::Result<Vec<u8>> {
        let mut part = vec![0; len as usize];
        self.input
            .read_exact(&mut part)
            .map_err(|_| invalid("the snapshot is cut short"))?;
        Ok(part)
    }

    /// The next record; `None` after the end marker, once the count and the end of the
    /// file are checked.
    pub(crate) fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let key_len = self.read_u32()?;
        if key_len == END {
            let mut raw = [0; 8];
            self.input
                .read_exact(&mut raw)
                .map_err(|_| invalid("the snapshot is cut short"))?;
            if u64::from_be_bytes(raw) != self.count {
                return Err(invalid("the snapshot's record count does not match"));
            }
            if self.input.read(&mut [0; 1])? != 0 {
                return Err(invalid("bytes after the snapshot's end"));
            }
            self.done = true;
            return Ok(None);
        }
        let key = self.read_part(key_len)?;
        let value_len = self.read_u32()?;
        let value = self.read_part(value_len)?;
        self.count += 1;
        Ok(Some((key, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut reader = RecordReader::open(path)?;
        let mut out = Vec::new();
        while let Some(r) = reader.next_record()? {
            out.push(r);
        }
        Ok(out)
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let records: Vec<(Vec<u8>, Vec<u8>)> = (0..1000u32)
            .map(|i| (format!("k{i}").into_bytes(), vec![i as u8; i as usize]))
            .collect();
        let size = write_file(&path, records.clone()).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert_eq!(read_all(&path).unwrap(), records);

        let whole = std::fs::read(&path).unwrap();
        for cut in [10, whole.len() / 2, whole.len() - 1] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            assert!(read_all(&path).is_err(), "cut at {cut} accepted");
        }
        let mut longer = whole.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(read_all(&path).is_err(), "trailing bytes accepted");
        let mut miscounted = whole;
        let last = miscounted.len() - 1;
        miscounted[last] ^= 1;
        std::fs::write(&path, &miscounted).unwrap();
        assert!(read_all(&path).is_err(), "a wrong count accepted");
    }
}

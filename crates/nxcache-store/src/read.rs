use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::checksum::{Checksum, ChecksumHasher};
use crate::index::BlobMeta;
use crate::key::BlobKey;
use crate::store::BlobStore;

/// Blobs up to this size are read whole and verified before the first byte is sent, so a
/// corrupt one is answered as a miss. Larger ones are streamed (see [`BlobBody::Stream`]).
pub(crate) const VERIFY_BEFORE_SEND_MAX: u64 = 1024 * 1024;

/// Read size of the streaming path: large enough for disk throughput, small enough that
/// a 1 GiB download stays within a few MiB of memory.
const STREAM_CHUNK: usize = 256 * 1024;

pub struct BlobRead {
    pub meta: BlobMeta,
    pub body: BlobBody,
}

pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

pub enum BlobBody {
    /// The whole blob, already verified against its checksum.
    Verified(Bytes),
    /// A verified stream (see [`verify_stream`]).
    Stream(ByteStream),
}

struct Verifying {
    inner: ByteStream,
    hasher: ChecksumHasher,
    size: u64,
    checksum: Checksum,
    received: u64,
    held_back: Option<Bytes>,
    done: bool,
}

/// Passes `inner` through while checking it against `size` and `checksum`. The last
/// chunk is held back until everything before it matched; on a mismatch the stream ends
/// in an `InvalidData` error instead, so a consumer never receives all the bytes of a
/// damaged blob (an HTTP client sees a cut transfer). Used for local files and for blobs
/// relayed from peers alike.
pub fn verify_stream(inner: ByteStream, size: u64, checksum: Checksum) -> ByteStream {
    let state = Verifying {
        inner,
        hasher: ChecksumHasher::new(),
        size,
        checksum,
        received: 0,
        held_back: None,
        done: false,
    };
    Box::pin(futures_util::stream::try_unfold(
        state,
        |mut st| async move {
            loop {
                if st.done {
                    return Ok(None);
                }
                match st.inner.next().await {
                    Some(chunk) => {
                        let chunk = chunk?;
                        st.received += chunk.len() as u64;
                        if st.received > st.size {
                            return Err(mismatch());
                        }
                        st.hasher.update(&chunk);
                        if let Some(previous) = st.held_back.replace(chunk) {
                            return Ok(Some((previous, st)));
                        }
                    }
                    None => {
                        st.done = true;
                        if st.received != st.size || st.hasher.finish() != st.checksum {
                            return Err(mismatch());
                        }
                        return Ok(st.held_back.take().map(|last| (last, st)));
                    }
                }
            }
        },
    ))
}

fn mismatch() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the artifact's bytes do not match its size and checksum",
    )
}

/// A stored blob's file as a verified stream; a blob found corrupt is dropped.
pub(crate) fn verified_stream(
    store: BlobStore,
    key: BlobKey,
    meta: BlobMeta,
    file: tokio::fs::File,
) -> BlobBody {
    let raw = tokio_util::io::ReaderStream::with_capacity(file, STREAM_CHUNK);
    let checked = verify_stream(Box::pin(raw), meta.size, meta.checksum);
    BlobBody::Stream(Box::pin(checked.then(move |item| {
        let (store, key) = (store.clone(), key.clone());
        async move {
            if let Err(err) = &item
                && err.kind() == std::io::ErrorKind::InvalidData
            {
                store.drop_corrupt(&key, &meta).await;
            }
            item
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> ByteStream {
        let items: Vec<std::io::Result<Bytes>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        Box::pin(futures_util::stream::iter(items))
    }

    async fn collect(s: ByteStream) -> (Vec<u8>, Option<std::io::ErrorKind>) {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e.kind())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn intact_streams_pass_through_whole() {
        let sum = crate::checksum::checksum_of(b"hello world");
        let (out, err) = collect(verify_stream(chunks(&[b"hello", b" ", b"world"]), 11, sum)).await;
        assert_eq!((out.as_slice(), err), (&b"hello world"[..], None));
    }

    #[tokio::test]
    async fn damaged_streams_never_deliver_all_their_bytes() {
        let sum = crate::checksum::checksum_of(b"hello world");
        for (parts, size) in [
            (&[&b"hello"[..], b" ", b"worle"][..], 11u64), // last byte changed
            (&[&b"hello"[..], b" ", b"wor"][..], 11),      // short
            (&[&b"hello"[..], b" ", b"world", b"!"][..], 11), // long
        ] {
            let parts: Vec<&'static [u8]> = parts.to_vec();
            let (out, err) = collect(verify_stream(chunks(&parts), size, sum)).await;
            assert_eq!(err, Some(std::io::ErrorKind::InvalidData));
            assert!(out.len() < 11, "{} bytes delivered", out.len());
        }
    }
}

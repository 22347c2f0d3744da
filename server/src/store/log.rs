//! The store's own write-ahead log: append-only segment files of
//! checksummed records, one record per committed batch.
//!
//! A record is `len (u32 LE) | xxh3-64 of the payload (u64 LE) | payload`.
//! Recovery reads every segment in order and stops at the first record that
//! is short or fails its checksum (the torn tail of a write cut by a crash).
//! The payload is a list of [`RawOp`]s, the writes of one batch at the level
//! of keyspaces, so the log needs no knowledge of the records it carries.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

/// Bytes before a record's payload.
const HEADER_BYTES: usize = 12;
/// Largest payload accepted when reading back (a batch is far smaller).
const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;
/// Segment file names: `<number>.log`, numbered from 1 upwards.
const SUFFIX: &str = ".log";

/// What a [`RawOp`] does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Set the key to the value.
    Put = 0,
    /// Remove the key.
    Remove = 1,
    /// Remove every key starting with the key.
    RemovePrefix = 2,
}

/// One write to one keyspace, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawOp {
    /// Which keyspace (see `embedded::Target`).
    pub target: u8,
    /// For the dedup day keyspaces: the day; otherwise 0.
    pub day: u64,
    /// What to do.
    pub kind: Kind,
    /// The key or prefix.
    pub key: Vec<u8>,
    /// The value (empty unless [`Kind::Put`]).
    pub value: bytes::Bytes,
}

/// Encodes a batch's ops as one record payload.
pub fn encode(ops: &[RawOp], out: &mut Vec<u8>) {
    for op in ops {
        out.push(op.target);
        out.push(op.kind as u8);
        out.extend_from_slice(&op.day.to_le_bytes());
        put_bytes(out, &op.key);
        put_bytes(out, &op.value);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Keys and values are bounded far below 4 GiB by the frame limit.
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(b);
}

/// Decodes a record payload; `None` if it is malformed.
pub fn decode(mut p: &[u8]) -> Option<Vec<RawOp>> {
    let mut ops = Vec::new();
    while !p.is_empty() {
        let (&target, rest) = p.split_first()?;
        let (&kind, rest) = rest.split_first()?;
        let kind = match kind {
            0 => Kind::Put,
            1 => Kind::Remove,
            2 => Kind::RemovePrefix,
            _ => return None,
        };
        let day = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        let (key, rest) = take_bytes(rest.get(8..)?)?;
        let (value, rest) = take_bytes(rest)?;
        ops.push(RawOp {
            target,
            day,
            kind,
            key: key.to_vec(),
            value: bytes::Bytes::copy_from_slice(value),
        });
        p = rest;
    }
    Some(ops)
}

fn take_bytes(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::try_from(u32::from_le_bytes(p.get(..4)?.try_into().ok()?)).ok()?;
    let b = p.get(4..4 + len)?;
    Some((b, p.get(4 + len..)?))
}

/// The open log: the segment being appended to.
pub struct Log {
    dir: PathBuf,
    file: File,
    number: u64,
    bytes: u64,
    buf: Vec<u8>,
}

/// What [`Log::open`] found on disk.
pub struct Recovered {
    /// The payloads of every intact record, oldest first.
    pub records: Vec<Vec<u8>>,
    /// Whether a record was cut short or corrupt (the rest was ignored).
    pub torn: bool,
}

impl Log {
    /// Opens the log in `dir` (created if missing), reads what is there and
    /// starts a new segment after the existing ones. The old segments stay
    /// until [`Log::retire_older`].
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: &Path) -> io::Result<(Self, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let segments = segments(dir)?;
        let mut records = Vec::new();
        let mut torn = false;
        for (_, path) in &segments {
            if torn {
                break;
            }
            let data = std::fs::read(path)?;
            let mut at = 0usize;
            while at < data.len() {
                match read_record(&data[at..]) {
                    Some((payload, used)) => {
                        records.push(payload.to_vec());
                        at += used;
                    }
                    None => {
                        torn = true;
                        break;
                    }
                }
            }
        }
        let number = segments.last().map_or(1, |(n, _)| n + 1);
        let file = create_segment(dir, number)?;
        Ok((
            Self {
                dir: dir.to_owned(),
                file,
                number,
                bytes: 0,
                buf: Vec::new(),
            },
            Recovered { records, torn },
        ))
    }

    /// Appends one record (not yet synced).
    ///
    /// # Errors
    /// I/O errors; the log's tail is then unknown and it must be reopened.
    pub fn append(&mut self, ops: &[RawOp]) -> io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; HEADER_BYTES]);
        encode(ops, &mut self.buf);
        let payload_len = self.buf.len() - HEADER_BYTES;
        let sum = xxh3_64(&self.buf[HEADER_BYTES..]);
        let len = u32::try_from(payload_len).map_err(|_| io::Error::other("batch too large"))?;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..HEADER_BYTES].copy_from_slice(&sum.to_le_bytes());
        self.file.write_all(&self.buf)?;
        self.bytes += self.buf.len() as u64;
        if self.buf.capacity() > 1024 * 1024 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Makes every appended record durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Bytes appended to the current segment.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Starts a new segment and deletes every older one. Call only once
    /// everything they hold is durable elsewhere.
    ///
    /// # Errors
    /// I/O errors.
    pub fn retire_older(&mut self) -> io::Result<()> {
        let next = self.number + 1;
        self.file = create_segment(&self.dir, next)?;
        self.number = next;
        self.bytes = 0;
        for (n, path) in segments(&self.dir)? {
            if n < next {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

fn read_record(data: &[u8]) -> Option<(&[u8], usize)> {
    let len = usize::try_from(u32::from_le_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
    if len > MAX_RECORD_BYTES {
        return None;
    }
    let sum = u64::from_le_bytes(data.get(4..HEADER_BYTES)?.try_into().ok()?);
    let payload = data.get(HEADER_BYTES..HEADER_BYTES + len)?;
    (xxh3_64(payload) == sum).then_some((payload, HEADER_BYTES + len))
}

fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.join(format!("{number}{SUFFIX}")))?;
    // The new name must survive a crash before anything in it matters.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// The segments in `dir`, by number.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let n = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            out.push((n, path));
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(i: u8) -> RawOp {
        RawOp {
            target: i,
            day: u64::from(i) * 1000,
            kind: if i.is_multiple_of(2) {
                Kind::Put
            } else {
                Kind::Remove
            },
            key: vec![i; usize::from(i) + 1],
            value: bytes::Bytes::from(vec![i; usize::from(i) * 3]),
        }
    }

    #[test]
    fn records_come_back_in_order_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.records.is_empty() && !rec.torn);
        log.append(&[op(1), op(2)]).unwrap();
        log.append(&[op(3)]).unwrap();
        log.sync().unwrap();
        drop(log);
        // A third record cut short by a crash.
        let seg = dir.path().join("1.log");
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);

        let (mut log, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.torn);
        let got: Vec<Vec<RawOp>> = rec.records.iter().map(|r| decode(r).unwrap()).collect();
        assert_eq!(got, vec![vec![op(1), op(2)], vec![op(3)]]);
        // The new segment is separate; retiring drops the old ones.
        log.append(&[op(4)]).unwrap();
        log.sync().unwrap();
        log.retire_older().unwrap();
        drop(log);
        let (_, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.records.is_empty() && !rec.torn);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[op(5)]).unwrap();
        log.append(&[op(6)]).unwrap();
        drop(log);
        let seg = dir.path().join("1.log");
        let mut data = std::fs::read(&seg).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&seg, data).unwrap();
        let (_, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.torn);
        assert_eq!(rec.records.len(), 1);
        assert!(decode(&[9]).is_none());
    }
}

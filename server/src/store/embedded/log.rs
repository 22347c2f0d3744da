//! The store's own write-ahead log: segment files of checksummed records,
//! one record per committed batch.
//!
//! A record is `len (u32 LE) | xxh3-64 of the payload, seeded with the
//! segment's number (u64 LE) | payload`. Recovery reads every segment in
//! order, each up to its first record that is short or fails its checksum:
//! the torn tail of a write cut by a crash, or the older contents of a
//! reused file. The payload is a list of [`RawOp`]s, the writes of one
//! batch at the level of keyspaces, so the log needs no knowledge of the
//! records it carries.
//!
//! Retiring (every older segment goes) and rotating (all but the current
//! one go) reuse a retired segment's file for the next segment instead of
//! creating an empty one. Its blocks are allocated and written already, so
//! a record written over them changes no file metadata, and the sync that
//! makes it durable (`fdatasync`) needs no filesystem journal commit: on
//! ext4 that cost the server CPU (see docs/BENCHMARKS.md). The seed keeps
//! the file's older records from being read as the new segment's.
//!
//! A file is never appended to past its end either: when a record would
//! reach beyond it, the file first grows by [`GROW_BYTES`] of written zeros
//! (as PostgreSQL fills its WAL segments). A sync after a write that grew
//! the file must also write its inode (the new size and blocks), a second
//! synchronous disk write; this way only the first sync after each
//! [`GROW_BYTES`] pays it, not every sync of a fresh segment (the first
//! 32 MiB after every start) or of a reused one's tail. Zeros end a
//! segment when it is read back, like any record that fails its checksum.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes before a record's payload.
const HEADER_BYTES: usize = 12;
/// A segment file grows in steps of this many bytes of written zeros.
pub const GROW_BYTES: u64 = 1024 * 1024;
/// Zeros to grow a file with, a slice at a time.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
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
    /// Bytes of records in the current segment (the file may be longer).
    bytes: u64,
    /// The current segment file's length: records, then zeros or a reused
    /// file's older records.
    allocated: u64,
    buf: Vec<u8>,
    /// Set when retiring failed halfway, so the segment's name on disk may
    /// not match the seed its records would be written with: every later
    /// append fails, and the store reopens and recovers.
    broken: bool,
}

/// What [`Log::open`] found on disk.
pub struct Recovered {
    /// The payloads of every intact record, oldest first.
    pub records: Vec<Vec<u8>>,
    /// Whether a segment had bytes after its last intact record (ignored):
    /// a write cut by a crash, or the older contents of a reused file.
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
        // A segment that is not the newest was checkpointed before the next
        // one began, so what follows a bad record in it never mattered.
        for (number, path) in &segments {
            let data = std::fs::read(path)?;
            let mut at = 0usize;
            while at < data.len() {
                match read_record(&data[at..], *number) {
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
                allocated: 0,
                buf: Vec::new(),
                broken: false,
            },
            Recovered { records, torn },
        ))
    }

    /// Appends one record (not yet synced).
    ///
    /// # Errors
    /// I/O errors; the log's tail is then unknown and it must be reopened.
    pub fn append(&mut self, ops: &[RawOp]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other(
                "the store log failed while starting a segment",
            ));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; HEADER_BYTES]);
        encode(ops, &mut self.buf);
        let payload_len = self.buf.len() - HEADER_BYTES;
        let sum = xxh3_64_with_seed(&self.buf[HEADER_BYTES..], self.number);
        let len = u32::try_from(payload_len).map_err(|_| io::Error::other("batch too large"))?;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..HEADER_BYTES].copy_from_slice(&sum.to_le_bytes());
        self.grow_to(self.bytes + self.buf.len() as u64)?;
        // Positioned: the file is longer than what was written to it.
        self.file.write_all_at(&self.buf, self.bytes)?;
        self.bytes += self.buf.len() as u64;
        if self.buf.capacity() > 1024 * 1024 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Makes the file at least `end` bytes long, growing it by whole
    /// [`GROW_BYTES`] steps of written zeros (not a hole or an `fallocate`d
    /// range: writing into either changes the file's block map, which a
    /// sync must then write too).
    fn grow_to(&mut self, end: u64) -> io::Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let target = end.div_ceil(GROW_BYTES) * GROW_BYTES;
        let mut at = self.allocated;
        while at < target {
            let n = usize::try_from(target - at).map_or(ZEROS.len(), |n| n.min(ZEROS.len()));
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.allocated = target;
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
    /// The new segment reuses the file of the current segment or, if that
    /// one is larger (right after opening), of the one before it. Files are
    /// deleted oldest first, so after any failure what remains on disk is
    /// still the latest stretch of the history without gaps (replaying a
    /// stretch with a gap could bring back a value removed in the gap).
    ///
    /// # Errors
    /// I/O errors. After most of them the current segment goes on as
    /// before; if the new segment's name may not be durable, every later
    /// [`Log::append`] fails instead.
    pub fn retire_older(&mut self) -> io::Result<()> {
        let next = self.number + 1;
        let next_path = self.dir.join(segment_name(next));
        let current_path = self.dir.join(segment_name(self.number));
        let segments = segments(&self.dir)?;
        let previous = segments
            .iter()
            .rfind(|(n, _)| *n < self.number)
            .map(|(n, p)| (*n, p.clone(), file_len(p)));
        let donor = match previous {
            Some((n, p, len)) if len > file_len(&current_path) => Some((n, p, len)),
            _ => None,
        };
        let keep_from = donor.as_ref().map_or(self.number, |(n, _, _)| *n);
        for (n, path) in &segments {
            if *n < keep_from {
                std::fs::remove_file(path)?;
            }
        }
        match donor {
            None => {
                // The open descriptor follows the file to its new name.
                std::fs::rename(&current_path, &next_path)?;
                if let Err(e) = sync_dir(&self.dir) {
                    self.broken = true;
                    return Err(e);
                }
                self.number = next;
                self.bytes = 0;
            }
            Some((_, donor_path, donor_len)) => {
                // The donor is older than the current segment and holds
                // nothing that is not in fjall.
                self.continue_in(&donor_path, donor_len)?;
                std::fs::remove_file(&current_path)?;
            }
        }
        Ok(())
    }

    /// Starts a new segment and deletes every one before the current,
    /// which stays, as the previous, until the next rotation: what it
    /// holds need not be durable elsewhere yet, only what the older ones
    /// hold. The background checkpoint rotates, so that fjall's sync and
    /// the dedup records logged during its ingestion wait for the next
    /// checkpoint instead of holding up commits under the log lock.
    ///
    /// The new segment reuses the file of the newest deleted segment, or
    /// is a new file if there is none (the first rotation after opening).
    ///
    /// # Errors
    /// I/O errors, as for [`Log::retire_older`].
    pub fn rotate(&mut self) -> io::Result<()> {
        let older: Vec<(u64, PathBuf)> = segments(&self.dir)?
            .into_iter()
            .filter(|(n, _)| *n < self.number)
            .collect();
        let Some((donor_path, rest)) = older.split_last().map(|((_, p), rest)| (p, rest)) else {
            let next = self.number + 1;
            self.file = create_segment(&self.dir, next)?;
            self.allocated = 0;
            self.number = next;
            self.bytes = 0;
            return Ok(());
        };
        for (_, path) in rest {
            std::fs::remove_file(path)?;
        }
        self.continue_in(donor_path, file_len(donor_path))
    }

    /// Makes the file at `donor_path`, `donor_len` bytes long and holding
    /// nothing needed any more, the next segment. Under its new name its
    /// records fail the new seed.
    fn continue_in(&mut self, donor_path: &Path, donor_len: u64) -> io::Result<()> {
        let next = self.number + 1;
        let next_path = self.dir.join(segment_name(next));
        std::fs::rename(donor_path, &next_path)?;
        let file = OpenOptions::new().write(true).open(&next_path)?;
        if let Err(e) = sync_dir(&self.dir) {
            self.broken = true;
            return Err(e);
        }
        self.allocated = donor_len;
        self.file = file;
        self.number = next;
        self.bytes = 0;
        Ok(())
    }
}

fn segment_name(number: u64) -> String {
    format!("{number}{SUFFIX}")
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_record(data: &[u8], number: u64) -> Option<(&[u8], usize)> {
    let len = usize::try_from(u32::from_le_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
    if len > MAX_RECORD_BYTES {
        return None;
    }
    let sum = u64::from_le_bytes(data.get(4..HEADER_BYTES)?.try_into().ok()?);
    let payload = data.get(HEADER_BYTES..HEADER_BYTES + len)?;
    (xxh3_64_with_seed(payload, number) == sum).then_some((payload, HEADER_BYTES + len))
}

fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.join(segment_name(number)))?;
    // The new name must survive a crash before anything in it matters.
    sync_dir(dir)?;
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
        std::io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3]).unwrap();
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
        assert!(rec.records.is_empty());
    }

    fn names(dir: &Path) -> Vec<u64> {
        segments(dir).unwrap().into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn a_reused_file_gives_back_only_its_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        for i in 0..20 {
            log.append(&[op(i % 7)]).unwrap();
        }
        log.sync().unwrap();
        let full = log.len();
        let size = file_len(&dir.path().join("1.log"));
        assert_eq!(size, GROW_BYTES);
        // No older segment: the current file becomes segment 2.
        log.retire_older().unwrap();
        assert_eq!(names(dir.path()), vec![2]);
        assert_eq!(file_len(&dir.path().join("2.log")), size);
        log.append(&[op(3)]).unwrap();
        log.append(&[op(4)]).unwrap();
        log.sync().unwrap();
        assert!(log.len() < full);
        drop(log);

        // The 18 older records behind the two new ones fail the new seed.
        let (mut log, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.torn);
        let got: Vec<Vec<RawOp>> = rec.records.iter().map(|r| decode(r).unwrap()).collect();
        assert_eq!(got, vec![vec![op(3)], vec![op(4)]]);
        assert_eq!(names(dir.path()), vec![2, 3]);

        // Right after opening, the replayed segment is larger than the new
        // one: its file is reused and the empty one deleted.
        log.retire_older().unwrap();
        assert_eq!(names(dir.path()), vec![4]);
        assert_eq!(file_len(&dir.path().join("4.log")), size);
        log.append(&[op(5)]).unwrap();
        log.sync().unwrap();
        drop(log);
        let (_, rec) = Log::open(dir.path()).unwrap();
        let got: Vec<Vec<RawOp>> = rec.records.iter().map(|r| decode(r).unwrap()).collect();
        assert_eq!(got, vec![vec![op(5)]]);
    }

    /// Rotating keeps the current segment beside the new one and deletes
    /// only the older ones, whose file the new segment reuses.
    #[test]
    fn rotating_keeps_the_current_segment_and_reuses_an_older_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[op(1)]).unwrap();
        log.sync().unwrap();
        // Nothing older to reuse: a new file.
        log.rotate().unwrap();
        assert_eq!(names(dir.path()), vec![1, 2]);
        assert_eq!(file_len(&dir.path().join("2.log")), 0);
        for i in 0..20 {
            log.append(&[op(i % 7)]).unwrap();
        }
        log.sync().unwrap();
        // Segment 1 goes and its file becomes segment 3; 2 stays.
        log.rotate().unwrap();
        assert_eq!(names(dir.path()), vec![2, 3]);
        assert_eq!(file_len(&dir.path().join("3.log")), GROW_BYTES);
        log.append(&[op(2)]).unwrap();
        log.sync().unwrap();
        drop(log);

        // Both segments are replayed, in order, and the reused file's older
        // record fails the new seed.
        let (mut log, rec) = Log::open(dir.path()).unwrap();
        let got: Vec<Vec<RawOp>> = rec.records.iter().map(|r| decode(r).unwrap()).collect();
        assert_eq!(got.len(), 21);
        assert_eq!(got[0], vec![op(0)]);
        assert_eq!(got[19], vec![op(19 % 7)]);
        assert_eq!(got[20], vec![op(2)]);
        assert_eq!(names(dir.path()), vec![2, 3, 4]);
        // Retiring after that replay leaves only the new segment.
        log.retire_older().unwrap();
        assert_eq!(names(dir.path()), vec![5]);
    }

    /// Records never extend the file: it grows ahead of them in whole
    /// steps of zeros, which read back as the segment's end.
    #[test]
    fn segments_grow_ahead_of_their_records_in_steps_of_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("1.log");
        let (mut log, _) = Log::open(dir.path()).unwrap();
        assert_eq!(file_len(&seg), 0);
        log.append(&[op(1)]).unwrap();
        assert_eq!(file_len(&seg), GROW_BYTES);
        let first = log.len();
        // A record larger than a step grows the file past its end at once.
        let big = RawOp {
            value: bytes::Bytes::from(vec![7u8; 1_500_000]),
            ..op(2)
        };
        log.append(std::slice::from_ref(&big)).unwrap();
        assert_eq!(file_len(&seg), 2 * GROW_BYTES);
        let mut small = 0;
        while log.len() + 60 <= 2 * GROW_BYTES {
            log.append(&[op(3)]).unwrap();
            small += 1;
        }
        assert_eq!(file_len(&seg), 2 * GROW_BYTES);
        // More than 60 bytes: it crosses the end.
        let last = RawOp {
            value: bytes::Bytes::from(vec![4u8; 100]),
            ..op(4)
        };
        log.append(std::slice::from_ref(&last)).unwrap();
        assert_eq!(file_len(&seg), 3 * GROW_BYTES);
        log.sync().unwrap();
        let used = usize::try_from(log.len()).unwrap();
        drop(log);
        let data = std::fs::read(&seg).unwrap();
        assert!(
            data[used..].iter().all(|&b| b == 0),
            "zeros after the records"
        );
        assert!(first > 0);

        let (_, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.torn, "the zeros are read as the segment's end");
        let got: Vec<Vec<RawOp>> = rec.records.iter().map(|r| decode(r).unwrap()).collect();
        assert_eq!(got.len(), small + 3);
        assert_eq!(got[0], vec![op(1)]);
        assert_eq!(got[1], vec![big]);
        assert!(got[2..=small + 1].iter().all(|g| *g == vec![op(3)]));
        assert_eq!(got[small + 2], vec![last]);
    }

    #[test]
    fn a_bad_record_ends_only_its_own_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[op(1)]).unwrap();
        log.sync().unwrap();
        drop(log);
        // Segment 1 gets a torn tail; segment 2 (started by the reopen)
        // holds a later batch, which must still come back.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("1.log"))
            .unwrap();
        std::io::Write::write_all(&mut f, &[9, 9, 9]).unwrap();
        drop(f);
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[op(2)]).unwrap();
        log.sync().unwrap();
        drop(log);
        let (_, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.torn);
        let got: Vec<Vec<RawOp>> = rec.records.iter().map(|r| decode(r).unwrap()).collect();
        assert_eq!(got, vec![vec![op(1)], vec![op(2)]]);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[op(5)]).unwrap();
        log.append(&[op(6)]).unwrap();
        let last = usize::try_from(log.len()).unwrap() - 1;
        drop(log);
        let seg = dir.path().join("1.log");
        let mut data = std::fs::read(&seg).unwrap();
        data[last] ^= 1;
        std::fs::write(&seg, data).unwrap();
        let (_, rec) = Log::open(dir.path()).unwrap();
        assert!(rec.torn);
        assert_eq!(rec.records.len(), 1);
        assert!(decode(&[9]).is_none());
    }
}

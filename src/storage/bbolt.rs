//! Read-only reader for bbolt (boltdb) files, the backend of etcd v3 (`member/snap/db`).
//!
//! File layout (little-endian, as written by bbolt on every platform etcd ships for):
//! pages of `page_size` bytes; pages 0 and 1 hold the two meta copies, every other page is
//! a B+tree branch or leaf page (or freelist, which we never read). A page starts with a
//! 16-byte header `id u64 | flags u16 | count u16 | overflow u32`; a page with `overflow = n`
//! spans `n + 1` consecutive pages. Element arrays follow the header, 16 bytes each:
//! branch `pos u32 | ksize u32 | child pgid u64`, leaf `flags u32 | pos u32 | ksize u32 |
//! vsize u32`, where `pos` counts from the element itself and the key (then, for leaves, the
//! value) lives there. A leaf element with flag 0x01 is a sub-bucket whose value is a bucket
//! header `root pgid u64 | sequence u64`; root 0 means the bucket's single leaf page is
//! stored inline right after that header.
//!
//! Pages are read on demand with positioned reads; nothing is memory-mapped and the file is
//! never read whole, so memory stays at tree height × page size plus the largest value.
//! Every length and page id read from the file is checked against the file before it is
//! used, so corrupt input yields a [`BboltError`], never a panic or an unbounded loop.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER_SIZE: usize = 16;
/// Branch and leaf elements are both 16 bytes.
const ELEMENT_SIZE: usize = 16;
/// The meta struct: magic, version, page size, flags, root bucket (16), freelist, pgid, txid, checksum.
const META_SIZE: usize = 64;
/// The checksum covers the meta struct up to the checksum field.
const META_CHECKSUM_OFFSET: usize = 56;
const BUCKET_HEADER_SIZE: usize = 16;

const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const BUCKET_LEAF_FLAG: u32 = 0x01;

const MIN_PAGE_SIZE: u32 = 512;
const MAX_PAGE_SIZE: u32 = 65536;
/// bbolt trees are balanced and shallow; anything deeper is a cycle or corruption.
const MAX_DEPTH: usize = 64;
/// Freelist pgid written by bbolt when the freelist is not persisted (`NoFreelistSync`).
const NO_FREELIST: u64 = u64::MAX;

/// Why a bbolt file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BboltError {
    /// The file could not be opened or its size read.
    #[error("{path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A positioned read failed or hit the end of the file.
    #[error("{path}: reading {len} bytes at offset {offset}: {source}")]
    Read {
        /// The database file.
        path: PathBuf,
        /// Byte offset of the read.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// The underlying error (`UnexpectedEof` for a short file).
        source: io::Error,
    },
    /// Neither meta page is valid.
    #[error("{path}: no valid meta page: meta 0: {meta0}; meta 1: {meta1}")]
    NoValidMeta {
        /// The database file.
        path: PathBuf,
        /// Why meta page 0 was rejected.
        meta0: String,
        /// Why meta page 1 was rejected.
        meta1: String,
    },
    /// The chosen meta page is valid but describes a file that cannot be this one.
    #[error("{path}: meta page {page} (txid {txid}): {reason}")]
    BadMeta {
        /// The database file.
        path: PathBuf,
        /// 0 or 1.
        page: u64,
        /// Transaction id of that meta.
        txid: u64,
        /// What is wrong.
        reason: String,
    },
    /// A page id points outside the pages the database has allocated.
    #[error("{path}: page {pgid} out of range (pages 2..{high_water} hold data)")]
    PageOutOfRange {
        /// The database file.
        path: PathBuf,
        /// The offending page id.
        pgid: u64,
        /// The meta's high-water mark (number of allocated pages).
        high_water: u64,
    },
    /// A page's header or element array is malformed.
    #[error("{path}: page {pgid} (offset {offset}): {reason}")]
    BadPage {
        /// The database file.
        path: PathBuf,
        /// The page (0 for a page stored inline in a bucket value).
        pgid: u64,
        /// Byte offset of the page in the file (of the holding page for inline pages).
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A B+tree walk went deeper than any real tree, or visited more pages than the file has.
    #[error("{path}: bucket {bucket}: tree walk at page {pgid}: {reason}")]
    BadTree {
        /// The database file.
        path: PathBuf,
        /// The bucket being walked, lossy UTF-8.
        bucket: String,
        /// The page where the walk stopped.
        pgid: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, BboltError>;

/// The fields of a bbolt meta page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Page size in bytes.
    pub page_size: u32,
    /// Meta flags (unused by bbolt, normally 0).
    pub flags: u32,
    /// Root page of the root bucket.
    pub root: u64,
    /// Sequence of the root bucket.
    pub sequence: u64,
    /// Freelist page, or `u64::MAX` when the freelist is not persisted.
    pub freelist: u64,
    /// High-water mark: number of pages allocated; valid page ids are below it.
    pub high_water: u64,
    /// Id of the transaction that wrote this meta.
    pub txid: u64,
}

/// A bbolt file opened for reading.
#[derive(Debug)]
pub struct Db {
    file: File,
    path: PathBuf,
    file_len: u64,
    meta: Meta,
    meta_page: u64,
    /// Recently read single pages, direct-mapped by id: point lookups in key order revisit the
    /// same branch and leaf pages. At most CACHE_SLOTS pages are held.
    cache: PageCache,
}

/// Pages `[first, first + buf.len() / page size)` as read from the file: the last run an
/// [`Iter`] read ahead. A walk over a bucket mostly reads its leaves one after the other, so
/// one read of READ_AHEAD_PAGES serves many page reads.
#[derive(Default)]
struct ReadAhead {
    first: u64,
    buf: Vec<u8>,
    /// Pages the next run reads: grows while the walk reads the file in order, drops back to
    /// what is asked for when it jumps (a tree written over time scatters its leaves, and a
    /// fixed run then read the file several times over: 5.5 GB for a 1 GB backend).
    run: u64,
}

impl fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ReadAhead(from page {}, {} bytes)",
            self.first,
            self.buf.len()
        )
    }
}

/// Pages read at once when a page is not in the read-ahead run (128 KiB at 4 KiB pages).
const READ_AHEAD_PAGES: u64 = 32;

/// The page cache of a [`Db`].
struct PageCache(std::sync::Mutex<Vec<Option<Page>>>);

impl fmt::Debug for PageCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageCache({CACHE_SLOTS} slots)")
    }
}

/// Pages the read cache holds (4 MiB at the usual 4 KiB page size).
const CACHE_SLOTS: usize = 1024;

impl Db {
    /// Opens `path`, validates both meta pages and picks the valid one with the highest txid.
    pub fn open(path: impl AsRef<Path>) -> Result<Db> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| BboltError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_err)?;
        let file_len = file.metadata().map_err(open_err)?.len();
        let meta0 = read_meta(&file, 0, 0);
        // Meta 1 sits one page in; if meta 0 is unusable, probe every legal page size.
        let meta1 = match &meta0 {
            Ok(m) => read_meta(&file, 1, u64::from(m.page_size)),
            Err(_) => probe_meta1(&file),
        };
        let (meta_page, meta) = match (meta0, meta1) {
            (Ok(a), Ok(b)) if b.txid > a.txid => (1, b),
            (Ok(a), _) => (0, a),
            (Err(_), Ok(b)) => (1, b),
            (Err(meta0), Err(meta1)) => {
                return Err(BboltError::NoValidMeta {
                    path,
                    meta0: meta0.to_string(),
                    meta1: meta1.to_string(),
                })
            }
        };
        let db = Db {
            file,
            path,
            file_len,
            meta,
            meta_page,
            cache: PageCache(std::sync::Mutex::new(vec![None; CACHE_SLOTS])),
        };
        db.check_meta()?;
        Ok(db)
    }

    /// The file this database was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.meta.page_size as usize
    }

    /// The meta page in use.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Which meta page (0 or 1) is in use.
    pub fn meta_page(&self) -> u64 {
        self.meta_page
    }

    /// The root bucket, whose entries are the top-level buckets.
    pub fn root(&self) -> Bucket<'_> {
        Bucket {
            db: self,
            name: Vec::new(),
            root: Root::Page(self.meta.root),
        }
    }

    /// The top-level bucket `name`, if it exists.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'_>>> {
        self.root().bucket(name)
    }

    /// Names of the top-level buckets, in key order.
    pub fn bucket_names(&self) -> Result<Vec<Vec<u8>>> {
        self.root().buckets()
    }

    /// Checks the chosen meta against the file: no fallback, a bad newest meta is an error.
    fn check_meta(&self) -> Result<()> {
        let m = self.meta;
        let bad = |reason: String| BboltError::BadMeta {
            path: self.path.clone(),
            page: self.meta_page,
            txid: m.txid,
            reason,
        };
        if m.high_water < 3 {
            return Err(bad(format!(
                "high-water mark {} leaves no root page",
                m.high_water
            )));
        }
        let needed = m
            .high_water
            .checked_mul(u64::from(m.page_size))
            .ok_or_else(|| bad(format!("high-water mark {} overflows", m.high_water)))?;
        // Every page below the high-water mark has been written, so a shorter file lost data.
        if self.file_len < needed {
            return Err(bad(format!(
                "file is {} bytes but {} pages of {} bytes are in use ({needed} bytes): truncated",
                self.file_len, m.high_water, m.page_size
            )));
        }
        if m.root < 2 || m.root >= m.high_water {
            return Err(bad(format!(
                "root page {} outside 2..{}",
                m.root, m.high_water
            )));
        }
        if m.freelist != NO_FREELIST && (m.freelist < 2 || m.freelist >= m.high_water) {
            return Err(bad(format!(
                "freelist page {} outside 2..{}",
                m.freelist, m.high_water
            )));
        }
        Ok(())
    }

    /// Reads page `pgid` including its overflow pages (through the cache for single pages).
    fn read_page(&self, pgid: u64) -> Result<Page> {
        let slot = (pgid % CACHE_SLOTS as u64) as usize;
        if let Ok(cache) = self.cache.0.lock() {
            if let Some(p) = cache[slot].as_ref().filter(|p| p.pgid == pgid) {
                return Ok(p.clone());
            }
        }
        let page = self.read_page_uncached(pgid, None)?;
        if page.buf.len() == self.page_size() {
            if let Ok(mut cache) = self.cache.0.lock() {
                cache[slot] = Some(page.clone());
            }
        }
        Ok(page)
    }

    /// Reads page `pgid` including its overflow pages; it must be a branch or leaf page. Through
    /// `ahead` when given.
    fn read_page_uncached(&self, pgid: u64, mut ahead: Option<&mut ReadAhead>) -> Result<Page> {
        let high_water = self.meta.high_water;
        if pgid < 2 || pgid >= high_water {
            return Err(BboltError::PageOutOfRange {
                path: self.path.clone(),
                pgid,
                high_water,
            });
        }
        let ps = self.page_size();
        // pgid < high_water and high_water * page_size <= file length, so this cannot overflow.
        let offset = pgid * ps as u64;
        let mut buf = vec![0u8; ps];
        self.read_pages(&mut buf, pgid, ahead.as_deref_mut())?;
        let header = PageHeader::parse(&buf);
        let bad = |reason: String| BboltError::BadPage {
            path: self.path.clone(),
            pgid,
            offset,
            reason,
        };
        if header.id != pgid {
            return Err(bad(format!("header names page {}", header.id)));
        }
        if header.overflow > 0 {
            let last = pgid + u64::from(header.overflow);
            if last >= high_water {
                return Err(bad(format!(
                    "{} overflow pages run past the high-water mark {high_water}",
                    header.overflow
                )));
            }
            // Bounded by the file length: last < high_water.
            let total = (u64::from(header.overflow) + 1) * ps as u64;
            buf.resize(total as usize, 0);
            self.read_pages(&mut buf[ps..], pgid + 1, ahead)?;
        }
        Page::new(buf, pgid).map_err(|fault| bad(fault.to_string()))
    }

    /// Fills `buf` (whole pages, below the high-water mark) from page `pgid` on, through the
    /// read-ahead run when given: a page outside it starts a new run there.
    fn read_pages(&self, buf: &mut [u8], pgid: u64, ahead: Option<&mut ReadAhead>) -> Result<()> {
        let ps = self.page_size() as u64;
        let Some(ahead) = ahead else {
            return self.read_at(buf, pgid * ps);
        };
        let want = buf.len() as u64;
        let inside =
            |a: &ReadAhead| pgid >= a.first && (pgid - a.first) * ps + want <= a.buf.len() as u64;
        if !inside(ahead) && want <= READ_AHEAD_PAGES * ps {
            // Onward from the last run (a walk skips the branch pages it has read already):
            // read further ahead; a jump elsewhere: read what is asked.
            let end = ahead.first + ahead.buf.len() as u64 / ps;
            let follows = pgid >= end && pgid <= end + ahead.run.max(1);
            let run_pages = if follows {
                (ahead.run * 2).clamp(1, READ_AHEAD_PAGES)
            } else {
                1
            };
            let pages = run_pages
                .max(want.div_ceil(ps))
                .min(self.meta.high_water.saturating_sub(pgid));
            let mut run = std::mem::take(&mut ahead.buf);
            run.resize((pages * ps) as usize, 0);
            self.read_at(&mut run, pgid * ps)?;
            *ahead = ReadAhead {
                first: pgid,
                buf: run,
                run: run_pages,
            };
        }
        if inside(ahead) {
            let from = ((pgid - ahead.first) * ps) as usize;
            buf.copy_from_slice(&ahead.buf[from..from + buf.len()]);
            return Ok(());
        }
        self.read_at(buf, pgid * ps)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| BboltError::Read {
                path: self.path.clone(),
                offset,
                len: buf.len(),
                source,
            })
    }

    fn tree_error(&self, bucket: &[u8], pgid: u64, reason: impl fmt::Display) -> BboltError {
        BboltError::BadTree {
            path: self.path.clone(),
            bucket: String::from_utf8_lossy(bucket).into_owned(),
            pgid,
            reason: reason.to_string(),
        }
    }
}

/// Finds meta page 1 without knowing the page size: the first legal size that places a
/// valid meta there; otherwise the reason a meta-looking page at some size was rejected.
fn probe_meta1(file: &File) -> std::result::Result<Meta, MetaFault> {
    let mut fault = MetaFault::Absent("no meta page at any legal page size".into());
    for ps in probe_page_sizes() {
        match read_meta(file, 1, u64::from(ps)) {
            Ok(m) => return Ok(m),
            Err(MetaFault::Invalid(e)) if matches!(fault, MetaFault::Absent(_)) => {
                fault = MetaFault::Invalid(format!("at offset {ps}: {e}"));
            }
            Err(_) => {}
        }
    }
    Err(fault)
}

/// Reads and validates meta page `page` located at byte `offset`.
fn read_meta(file: &File, page: u64, offset: u64) -> std::result::Result<Meta, MetaFault> {
    let mut buf = [0u8; PAGE_HEADER_SIZE + META_SIZE];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| MetaFault::Absent(format!("reading at offset {offset}: {e}")))?;
    let header = PageHeader::parse(&buf);
    let m = &buf[PAGE_HEADER_SIZE..];
    let meta = Meta {
        page_size: le_u32(m, 8),
        flags: le_u32(m, 12),
        root: le_u64(m, 16),
        sequence: le_u64(m, 24),
        freelist: le_u64(m, 32),
        high_water: le_u64(m, 40),
        txid: le_u64(m, 48),
    };
    let magic = le_u32(m, 0);
    let version = le_u32(m, 4);
    let checksum = le_u64(m, META_CHECKSUM_OFFSET);
    if magic != MAGIC {
        return Err(MetaFault::Absent(format!("bad magic {magic:#010x}")));
    }
    let invalid = MetaFault::Invalid;
    if version != VERSION {
        return Err(invalid(format!("unsupported version {version}")));
    }
    let sum = fnv1a64(&m[..META_CHECKSUM_OFFSET]);
    if checksum != sum {
        return Err(invalid(format!(
            "checksum {checksum:#018x} != computed {sum:#018x}"
        )));
    }
    if header.flags & META_PAGE == 0 {
        return Err(invalid(format!(
            "page flags {:#06x} lack the meta flag",
            header.flags
        )));
    }
    if header.id != page {
        return Err(invalid(format!("page header names page {}", header.id)));
    }
    if !valid_page_size(meta.page_size) {
        return Err(invalid(format!("invalid page size {}", meta.page_size)));
    }
    if offset != page * u64::from(meta.page_size) {
        return Err(invalid(format!(
            "page size {} does not place it at offset {offset}",
            meta.page_size
        )));
    }
    Ok(meta)
}

/// Why a meta page was rejected.
enum MetaFault {
    /// Nothing meta-like there (unreadable or wrong magic).
    Absent(String),
    /// A meta page, but damaged or inconsistent.
    Invalid(String),
}

impl fmt::Display for MetaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaFault::Absent(s) | MetaFault::Invalid(s) => f.write_str(s),
        }
    }
}

/// Legal page sizes, smallest first.
fn probe_page_sizes() -> impl Iterator<Item = u32> {
    (MIN_PAGE_SIZE.trailing_zeros()..=MAX_PAGE_SIZE.trailing_zeros()).map(|shift| 1u32 << shift)
}

fn valid_page_size(ps: u32) -> bool {
    ps.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps)
}

/// FNV-1a, 64 bit: the meta checksum.
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// Fixed-width little-endian reads; callers have checked that the bytes exist.
fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A page header; callers guarantee at least `PAGE_HEADER_SIZE` bytes.
struct PageHeader {
    id: u64,
    flags: u16,
    count: u16,
    overflow: u32,
}

impl PageHeader {
    fn parse(b: &[u8]) -> PageHeader {
        PageHeader {
            id: le_u64(b, 0),
            flags: le_u16(b, 8),
            count: le_u16(b, 10),
            overflow: le_u32(b, 12),
        }
    }
}

/// Why a page's header or elements cannot be read: the `reason` of a [`BboltError::BadPage`]
/// or [`BboltError::BadTree`], which name the page.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum PageFault {
    #[error("{len} bytes cannot hold a page header")]
    NoHeader { len: usize },
    #[error("flags {flags:#06x}: not a branch or leaf page")]
    NotBranchOrLeaf { flags: u16 },
    #[error("{count} elements do not fit in {len} bytes")]
    ElementsOverflow { count: usize, len: usize },
    #[error("branch page without elements")]
    EmptyBranch,
    #[error("element at byte {start} points to bytes {from}..{to} past the page end {page_len}")]
    PastEnd {
        start: usize,
        from: u64,
        to: u64,
        page_len: usize,
    },
    #[error("leaf element {index} has unknown flags {flags:#x}")]
    UnknownLeafFlags { index: usize, flags: u32 },
}

/// A branch or leaf page whose element array is known to fit in `buf`.
#[derive(Clone)]
struct Page {
    /// Shared: cached pages are handed out by cloning the handle, not the bytes.
    buf: std::sync::Arc<Vec<u8>>,
    /// Page id for error messages (0 for inline pages).
    pgid: u64,
    branch: bool,
    count: usize,
}

/// A leaf element, borrowed from its page.
struct LeafElement<'p> {
    flags: u32,
    key: &'p [u8],
    value: &'p [u8],
    /// Where the key starts, from the page's start.
    offset: u32,
}

impl Page {
    /// Validates the header and element array.
    fn new(buf: Vec<u8>, pgid: u64) -> std::result::Result<Page, PageFault> {
        if buf.len() < PAGE_HEADER_SIZE {
            return Err(PageFault::NoHeader { len: buf.len() });
        }
        let header = PageHeader::parse(&buf);
        let branch = match header.flags {
            BRANCH_PAGE => true,
            LEAF_PAGE => false,
            flags => return Err(PageFault::NotBranchOrLeaf { flags }),
        };
        let count = usize::from(header.count);
        if PAGE_HEADER_SIZE + count * ELEMENT_SIZE > buf.len() {
            return Err(PageFault::ElementsOverflow {
                count,
                len: buf.len(),
            });
        }
        if branch && count == 0 {
            return Err(PageFault::EmptyBranch);
        }
        Ok(Page {
            buf: std::sync::Arc::new(buf),
            pgid,
            branch,
            count,
        })
    }

    /// Bytes `[start + pos, +len)` relative to an element at `start`, bounds-checked.
    fn slice(&self, start: usize, pos: u32, len: u64) -> std::result::Result<&[u8], PageFault> {
        let from = start as u64 + u64::from(pos);
        let to = from + len;
        if to > self.buf.len() as u64 {
            return Err(PageFault::PastEnd {
                start,
                from,
                to,
                page_len: self.buf.len(),
            });
        }
        Ok(&self.buf[from as usize..to as usize])
    }

    /// Key and child page of branch element `i` (`i < count`).
    fn branch_element(&self, i: usize) -> std::result::Result<(&[u8], u64), PageFault> {
        let at = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
        let pos = le_u32(&self.buf, at);
        let ksize = le_u32(&self.buf, at + 4);
        let child = le_u64(&self.buf, at + 8);
        Ok((self.slice(at, pos, u64::from(ksize))?, child))
    }

    /// Leaf element `i` (`i < count`).
    fn leaf_element(&self, i: usize) -> std::result::Result<LeafElement<'_>, PageFault> {
        let at = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
        let flags = le_u32(&self.buf, at);
        let pos = le_u32(&self.buf, at + 4);
        let ksize = le_u32(&self.buf, at + 8);
        let vsize = le_u32(&self.buf, at + 12);
        if flags & !BUCKET_LEAF_FLAG != 0 {
            return Err(PageFault::UnknownLeafFlags { index: i, flags });
        }
        let both = self.slice(at, pos, u64::from(ksize) + u64::from(vsize))?;
        let (key, value) = both.split_at(ksize as usize);
        // slice() checked that the element lies within the page, whose size fits in u32.
        let offset = (at as u64 + u64::from(pos)) as u32;
        Ok(LeafElement {
            flags,
            key,
            value,
            offset,
        })
    }

    /// Key of element `i`, whatever the page kind.
    fn key(&self, i: usize) -> std::result::Result<&[u8], PageFault> {
        if self.branch {
            Ok(self.branch_element(i)?.0)
        } else {
            Ok(self.leaf_element(i)?.key)
        }
    }

    /// Index of the last element whose key is <= `key` (0 if none): where a branch descends.
    fn branch_index(&self, key: &[u8]) -> std::result::Result<usize, PageFault> {
        let (mut lo, mut hi) = (0, self.count);
        // Invariant: keys before lo are <= key, keys from hi on are > key.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid)? <= key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo.saturating_sub(1))
    }

    /// Index of the element whose key equals `key`, if any.
    fn find(&self, key: &[u8]) -> std::result::Result<Option<usize>, PageFault> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.key(mid)?.cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(mid)),
            }
        }
        Ok(None)
    }
}

/// Where a bucket's tree starts.
#[derive(Clone)]
enum Root {
    Page(u64),
    /// Small buckets keep their single leaf page inside the parent's value.
    Inline(Page),
}

/// A bucket: a B+tree of keys, each holding a value or a nested bucket.
#[derive(Clone)]
pub struct Bucket<'db> {
    db: &'db Db,
    /// Full name for error messages (nested names joined by `/`).
    name: Vec<u8>,
    root: Root,
}

impl fmt::Debug for Bucket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root = match &self.root {
            Root::Page(p) => format!("page {p}"),
            Root::Inline(_) => "inline".to_string(),
        };
        write!(
            f,
            "Bucket({:?}, {root})",
            String::from_utf8_lossy(&self.name)
        )
    }
}

/// Where a leaf element sits in the file: its page and its index on that page. Handed out by
/// [`Iter::location`]; [`Bucket::get_at`] reads the element again without descending the tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Location {
    /// The leaf page; 0 (a meta page, never a leaf) for elements of inline buckets.
    pgid: u64,
    /// Where the element's key starts, from the page's start (its value follows the key; a
    /// page with overflow pages is contiguous in the file).
    offset: u32,
    /// Key and value sizes.
    ksize: u32,
    vsize: u32,
    /// The element's index on the page.
    index: u16,
    /// Whether the element is a nested bucket.
    bucket: bool,
}

impl Location {
    /// Whether the element can be read back by location (inline buckets' elements cannot).
    pub fn is_known(&self) -> bool {
        self.pgid != 0
    }
}

/// What a key in a bucket holds.
#[derive(Debug)]
pub enum Value<'db> {
    /// A plain value.
    Data(Vec<u8>),
    /// A nested bucket.
    Bucket(Bucket<'db>),
}

impl<'db> Bucket<'db> {
    /// The bucket's name (nested names joined by `/`; empty for the root bucket).
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The value stored under `key`; `None` if absent or if `key` names a nested bucket.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(match self.lookup(key)? {
            Some((flags, value)) if flags & BUCKET_LEAF_FLAG == 0 => Some(value),
            _ => None,
        })
    }

    /// The value of `key` read at `loc` (from [`Iter::location`] on this bucket), without a
    /// descent: the element there must hold `key` and a plain value, else it is an error.
    /// An unknown location falls back to [`Bucket::get`].
    pub fn get_at(&self, loc: Location, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        Ok(self.get_at_into(loc, key, &mut buf)?.map(<[u8]>::to_vec))
    }

    /// [`Bucket::get_at`] into `buf` (reused from call to call): one read of exactly the
    /// element's key and value, the key checked against `key`.
    pub fn get_at_into<'b>(
        &self,
        loc: Location,
        key: &[u8],
        buf: &'b mut Vec<u8>,
    ) -> Result<Option<&'b [u8]>> {
        if !loc.is_known() {
            return Ok(self.get(key)?.map(|v| {
                *buf = v;
                buf.as_slice()
            }));
        }
        let high_water = self.db.meta.high_water;
        if loc.pgid < 2 || loc.pgid >= high_water {
            return Err(BboltError::PageOutOfRange {
                path: self.db.path.clone(),
                pgid: loc.pgid,
                high_water,
            });
        }
        let (ksize, vsize) = (loc.ksize as usize, loc.vsize as usize);
        buf.resize(ksize + vsize, 0);
        let offset = loc.pgid * self.db.page_size() as u64 + u64::from(loc.offset);
        self.db.read_at(buf, offset)?;
        if ksize != key.len() || buf[..ksize] != *key || loc.bucket {
            return Err(self.db.tree_error(
                &self.name,
                loc.pgid,
                format!(
                    "leaf element {} does not hold the value it held when the bucket was walked",
                    loc.index
                ),
            ));
        }
        Ok(Some(&buf[ksize..]))
    }

    /// The nested bucket `name`, if it exists (a plain value of that name is not a bucket).
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'db>>> {
        match self.lookup(name)? {
            Some((flags, value)) if flags & BUCKET_LEAF_FLAG != 0 => Ok(Some(open_child(
                self.db,
                &self.name,
                name,
                &value,
                self.root_pgid(),
            )?)),
            _ => Ok(None),
        }
    }

    /// Names of the nested buckets, in key order.
    pub fn buckets(&self) -> Result<Vec<Vec<u8>>> {
        let mut names = Vec::new();
        for item in self.iter() {
            if let (key, Value::Bucket(_)) = item? {
                names.push(key);
            }
        }
        Ok(names)
    }

    /// Streams `(key, value)` in key order; stops after the first error.
    pub fn iter(&self) -> Iter<'db> {
        Iter {
            db: self.db,
            name: self.name.clone(),
            root: Some(self.root.clone()),
            stack: Vec::new(),
            pages_read: 0,
            last_key: Vec::new(),
            has_last: false,
            location: Location::default(),
            done: false,
            ahead: ReadAhead::default(),
        }
    }

    /// Up to `parts` walks that together visit the bucket's elements, each a contiguous run of
    /// the root's children in key order: part i's keys all sort before part i+1's. One walk
    /// when the root is a leaf.
    pub fn iter_parts(&self, parts: usize) -> Result<Vec<Iter<'db>>> {
        let Root::Page(pgid) = self.root else {
            return Ok(vec![self.iter()]);
        };
        let mut probe = self.iter();
        let root = probe.read(pgid)?;
        let count = root.count;
        if !root.branch || parts < 2 || count < 2 {
            return Ok(vec![self.iter()]);
        }
        let parts = parts.min(count);
        let mut out = Vec::with_capacity(parts);
        for p in 0..parts {
            let (start, end) = (p * count / parts, (p + 1) * count / parts);
            let mut it = self.iter();
            it.root = None;
            it.pages_read = 1;
            it.push(root.clone(), None, None)?;
            if let Some(top) = it.stack.last_mut() {
                top.index = start;
                top.end = end;
            }
            out.push(it);
        }
        Ok(out)
    }

    fn root_pgid(&self) -> u64 {
        match self.root {
            Root::Page(p) => p,
            Root::Inline(_) => 0,
        }
    }

    /// The greatest key (the last element of the rightmost leaf), without walking the bucket;
    /// `None` for an empty bucket.
    pub fn last_key(&self) -> Result<Option<Vec<u8>>> {
        self.descend(
            |page| Ok(page.count.checked_sub(1)),
            |page| match page.count.checked_sub(1) {
                Some(last) => Ok(Some(page.leaf_element(last)?.key.to_vec())),
                None => Ok(None),
            },
        )
    }

    /// Descends to the leaf holding `key`; returns its element flags and value.
    fn lookup(&self, key: &[u8]) -> Result<Option<(u32, Vec<u8>)>> {
        self.descend(
            |page| page.branch_index(key).map(Some),
            |page| {
                Ok(match page.find(key)? {
                    Some(i) => {
                        let e = page.leaf_element(i)?;
                        Some((e.flags, e.value.to_vec()))
                    }
                    None => None,
                })
            },
        )
    }

    /// Walks from the root down the branch element `pick` chooses on each branch page (none:
    /// the answer is `None`), then answers with `at_leaf` on the leaf reached.
    fn descend<T>(
        &self,
        pick: impl Fn(&Page) -> std::result::Result<Option<usize>, PageFault>,
        at_leaf: impl Fn(&Page) -> std::result::Result<Option<T>, PageFault>,
    ) -> Result<Option<T>> {
        let mut page = match &self.root {
            Root::Page(p) => self.db.read_page(*p)?,
            Root::Inline(p) => p.clone(),
        };
        for _ in 0..MAX_DEPTH {
            let pgid = page.pgid;
            let at = |fault: PageFault| self.db.tree_error(&self.name, pgid, fault);
            if page.branch {
                let Some(i) = pick(&page).map_err(at)? else {
                    return Ok(None);
                };
                let (_, child) = page.branch_element(i).map_err(at)?;
                page = self.db.read_page(child)?;
                continue;
            }
            return at_leaf(&page).map_err(at);
        }
        Err(self.db.tree_error(
            &self.name,
            page.pgid,
            format!("deeper than {MAX_DEPTH} levels"),
        ))
    }
}

/// Opens the nested bucket `name` of bucket `parent` from its bucket-header `value`
/// (found on page `pgid`).
fn open_child<'db>(
    db: &'db Db,
    parent: &[u8],
    name: &[u8],
    value: &[u8],
    pgid: u64,
) -> Result<Bucket<'db>> {
    let mut full = parent.to_vec();
    if !full.is_empty() {
        full.push(b'/');
    }
    full.extend_from_slice(name);
    let bad = |reason: String| db.tree_error(&full, pgid, reason);
    if value.len() < BUCKET_HEADER_SIZE {
        return Err(bad(format!(
            "bucket header of {} bytes, need {BUCKET_HEADER_SIZE}",
            value.len()
        )));
    }
    let root_pgid = le_u64(value, 0);
    let root = if root_pgid == 0 {
        let page = Page::new(value[BUCKET_HEADER_SIZE..].to_vec(), 0)
            .map_err(|e| bad(format!("inline page: {e}")))?;
        if page.branch {
            return Err(bad("inline page is a branch page".into()));
        }
        Root::Inline(page)
    } else {
        Root::Page(root_pgid)
    };
    Ok(Bucket {
        db,
        name: full,
        root,
    })
}

/// A streaming in-order walk over one bucket: holds one page per tree level.
pub struct Iter<'db> {
    db: &'db Db,
    name: Vec<u8>,
    /// The root, until the first call to `next` loads it.
    root: Option<Root>,
    /// Path from the root to the current page.
    stack: Vec<Frame>,
    /// A valid tree reads each page once per walk; more reads than pages means a cycle.
    pages_read: u64,
    /// Keys must come out strictly increasing; anything else is a corrupt tree. The last key
    /// (a buffer reused from element to element), once `has_last`.
    last_key: Vec<u8>,
    has_last: bool,
    /// Where the element returned last sits.
    location: Location,
    done: bool,
    /// This walk's read-ahead run.
    ahead: ReadAhead,
}

/// One level of the walk: a page, the next element to visit, and the key range the
/// parent's branch keys allow below it (so that a walk that succeeds agrees with `get`).
struct Frame {
    page: Page,
    index: usize,
    /// The walk leaves the page at this element (the page's count, but for a part of a split
    /// walk's root).
    end: usize,
    /// Inclusive lower bound, if any.
    lower: Option<Vec<u8>>,
    /// Exclusive upper bound, if any.
    upper: Option<Vec<u8>>,
}

impl Frame {
    /// Child `i` of a branch frame and the key range it may hold: [key i, key i+1), within
    /// the frame's own range; the first child also takes smaller keys, as descent sends them
    /// there.
    fn child_range(&self, i: usize) -> std::result::Result<ChildRange, PageFault> {
        let (key, child) = self.page.branch_element(i)?;
        let lower = if i == 0 {
            self.lower.clone()
        } else {
            Some(key.to_vec())
        };
        let upper = if i + 1 < self.page.count {
            Some(self.page.key(i + 1)?.to_vec())
        } else {
            self.upper.clone()
        };
        Ok((child, lower, upper))
    }
}

/// A child page id with its inclusive lower and exclusive upper key bounds.
type ChildRange = (u64, Option<Vec<u8>>, Option<Vec<u8>>);

impl fmt::Debug for Iter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Iter({:?}, depth {})",
            String::from_utf8_lossy(&self.name),
            self.stack.len()
        )
    }
}

impl<'db> Iter<'db> {
    /// Where the element returned last by `next` sits (unknown before the first, and for
    /// elements of inline buckets).
    pub fn location(&self) -> Location {
        self.location
    }

    fn error(&self, pgid: u64, reason: impl fmt::Display) -> BboltError {
        self.db.tree_error(&self.name, pgid, reason)
    }

    /// Loads the page below branch element `index` of the top frame (or the root page).
    fn push(&mut self, page: Page, lower: Option<Vec<u8>>, upper: Option<Vec<u8>>) -> Result<()> {
        if page.branch {
            // Descent binary-searches branch keys: they must be strictly increasing.
            for i in 1..page.count {
                let prev = page.key(i - 1).map_err(|e| self.error(page.pgid, e))?;
                let key = page.key(i).map_err(|e| self.error(page.pgid, e))?;
                if prev >= key {
                    return Err(self.error(page.pgid, format!("branch key {i} out of order")));
                }
            }
        }
        self.stack.push(Frame {
            end: page.count,
            page,
            index: 0,
            lower,
            upper,
        });
        Ok(())
    }

    fn read(&mut self, pgid: u64) -> Result<Page> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.error(pgid, format!("deeper than {MAX_DEPTH} levels")));
        }
        self.pages_read += 1;
        if self.pages_read > self.db.meta.high_water {
            return Err(self.error(
                pgid,
                "more pages visited than the file holds: the tree has a cycle",
            ));
        }
        self.db.read_page_uncached(pgid, Some(&mut self.ahead))
    }

    /// Moves to the next leaf element, checking key order; `location` then names it. `false`
    /// at the end.
    fn advance(&mut self) -> Result<bool> {
        match self.root.take() {
            Some(Root::Page(p)) => {
                let page = self.read(p)?;
                self.push(page, None, None)?;
            }
            Some(Root::Inline(page)) => self.push(page, None, None)?,
            None => {}
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(false);
            };
            let (i, pgid) = (top.index, top.page.pgid);
            if i >= top.end {
                self.stack.pop();
                if let Some(parent) = self.stack.last_mut() {
                    parent.index += 1;
                }
                continue;
            }
            if top.page.branch {
                let (child, lower, upper) = top.child_range(i).map_err(|e| self.error(pgid, e))?;
                let page = self.read(child)?;
                self.push(page, lower, upper)?;
                continue;
            }
            top.index += 1;
            let (db, name) = (self.db, &self.name);
            let e = top
                .page
                .leaf_element(i)
                .map_err(|e| db.tree_error(name, pgid, e))?;
            let below = top.lower.as_deref().is_some_and(|l| e.key < l);
            let above = top.upper.as_deref().is_some_and(|u| e.key >= u);
            let repeated = self.has_last && self.last_key.as_slice() >= e.key;
            if below || above || repeated {
                return Err(self
                    .db
                    .tree_error(&self.name, pgid, format!("key {i} out of order")));
            }
            self.last_key.clear();
            self.last_key.extend_from_slice(e.key);
            self.has_last = true;
            // Page counts are u16, so the index fits.
            self.location = Location {
                pgid,
                offset: e.offset,
                ksize: e.key.len() as u32,
                vsize: e.value.len() as u32,
                index: i as u16,
                bucket: e.flags & BUCKET_LEAF_FLAG != 0,
            };
            return Ok(true);
        }
    }

    /// The element `advance` moved to, borrowed from its page.
    fn current(&self) -> Result<(LeafElement<'_>, u64)> {
        let top = self
            .stack
            .last()
            .ok_or_else(|| self.error(0, "no current element"))?;
        let pgid = top.page.pgid;
        let e = top
            .page
            .leaf_element(usize::from(self.location.index))
            .map_err(|e| self.error(pgid, e))?;
        Ok((e, pgid))
    }

    fn step(&mut self) -> Result<Option<(Vec<u8>, Value<'db>)>> {
        if !self.advance()? {
            return Ok(None);
        }
        let (e, pgid) = self.current()?;
        let key = e.key.to_vec();
        let value = if e.flags & BUCKET_LEAF_FLAG != 0 {
            Value::Bucket(open_child(self.db, &self.name, &key, e.value, pgid)?)
        } else {
            Value::Data(e.value.to_vec())
        };
        Ok(Some((key, value)))
    }

    /// Like `next`, but lends the key and value from the page instead of copying them, with
    /// where the element sits: for scans that keep little of each element. A nested bucket's
    /// value is `None`. After an error the walk is over.
    pub fn next_borrowed(&mut self) -> Option<Result<Borrowed<'_>>> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(true) => {}
            Ok(false) => {
                self.done = true;
                return None;
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        }
        let loc = self.location;
        Some(self.current().map(|(e, _)| {
            let value = (e.flags & BUCKET_LEAF_FLAG == 0).then_some(e.value);
            (e.key, value, loc)
        }))
    }
}

/// An element lent by [`Iter::next_borrowed`]: key, plain value (`None` for a nested bucket),
/// location.
pub type Borrowed<'a> = (&'a [u8], Option<&'a [u8]>, Location);

impl<'db> Iterator for Iter<'db> {
    type Item = Result<(Vec<u8>, Value<'db>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.step().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use crate::storage::testutil::fixture_db;

    #[test]
    fn fixture_3_0_17_buckets_and_point_reads_agree_with_iteration() {
        let (_dir, path) = fixture_db("etcd-3.0.17-v3");
        let db = Db::open(&path).unwrap();
        assert_eq!(db.page_size(), 4096);
        assert_eq!(db.meta().txid, 24, "the newer meta (page 0) wins");
        assert_eq!(db.meta_page(), 0);
        let names: Vec<String> = db
            .bucket_names()
            .unwrap()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        let expected =
            "alarm auth authRoles authUsers cluster key lease members members_removed meta";
        assert_eq!(names.join(" "), expected);
        let mut total = 0;
        for name in db.bucket_names().unwrap() {
            let bucket = db.bucket(&name).unwrap().unwrap();
            let mut last: Option<Vec<u8>> = None;
            for item in bucket.iter() {
                let (key, value) = item.unwrap();
                assert!(last.as_ref().is_none_or(|l| *l < key), "keys ascend");
                let Value::Data(value) = value else {
                    panic!("etcd has no nested buckets")
                };
                assert_eq!(bucket.get(&key).unwrap().as_ref(), Some(&value));
                assert!(bucket.bucket(&key).unwrap().is_none());
                let mut missing = key.clone();
                missing.push(0);
                assert_eq!(bucket.get(&missing).unwrap(), None);
                last = Some(key);
                total += 1;
            }
        }
        // 66 revisions (63 puts, one overwrite, one put + delete), 2 leases, 1 member,
        // 1 cluster version, 1 meta key.
        assert_eq!(total, 66 + 2 + 1 + 1 + 1);
        let key = db.bucket(b"key").unwrap().unwrap();
        assert_eq!(key.iter().count(), 66);
        assert!(format!("{:?}", db.bucket(b"lease").unwrap().unwrap()).contains("inline"));
        assert!(db.bucket(b"nope").unwrap().is_none());
    }

    // ---- hand-built files: nested, inline, branch and overflow pages, and corruption ----

    const PS: usize = 1024;

    fn header(id: u64, flags: u16, count: usize, overflow: u32) -> Vec<u8> {
        let mut h = id.to_le_bytes().to_vec();
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(count as u16).to_le_bytes());
        h.extend_from_slice(&overflow.to_le_bytes());
        h
    }

    /// A leaf page (unpadded); elements are (flags, key, value).
    fn leaf_bytes(id: u64, elems: &[(u32, &[u8], Vec<u8>)]) -> Vec<u8> {
        let mut page = header(id, LEAF_PAGE, elems.len(), 0);
        let mut data = Vec::new();
        for (i, (flags, key, value)) in elems.iter().enumerate() {
            let pos = (elems.len() - i) * ELEMENT_SIZE + data.len();
            for x in [*flags, pos as u32, key.len() as u32, value.len() as u32] {
                page.extend_from_slice(&x.to_le_bytes());
            }
            data.extend_from_slice(key);
            data.extend_from_slice(value);
        }
        page.extend_from_slice(&data);
        page
    }

    fn branch_bytes(id: u64, elems: &[(&[u8], u64)]) -> Vec<u8> {
        let mut page = header(id, BRANCH_PAGE, elems.len(), 0);
        let mut data = Vec::new();
        for (i, (key, child)) in elems.iter().enumerate() {
            let pos = (elems.len() - i) * ELEMENT_SIZE + data.len();
            page.extend_from_slice(&(pos as u32).to_le_bytes());
            page.extend_from_slice(&(key.len() as u32).to_le_bytes());
            page.extend_from_slice(&child.to_le_bytes());
            data.extend_from_slice(key);
        }
        page.extend_from_slice(&data);
        page
    }

    fn bucket_header(root: u64) -> Vec<u8> {
        let mut v = root.to_le_bytes().to_vec();
        v.extend_from_slice(&0u64.to_le_bytes());
        v
    }

    fn inline_bucket(elems: &[(u32, &[u8], Vec<u8>)]) -> Vec<u8> {
        let mut v = bucket_header(0);
        v.extend(leaf_bytes(0, elems));
        v
    }

    fn meta_bytes(id: u64, page_size: u32, root: u64, high_water: u64, txid: u64) -> Vec<u8> {
        let mut m = Vec::new();
        for x in [MAGIC, VERSION, page_size, 0] {
            m.extend_from_slice(&x.to_le_bytes());
        }
        for x in [root, 0, 2, high_water, txid] {
            m.extend_from_slice(&x.to_le_bytes());
        }
        let sum = fnv1a64(&m);
        m.extend_from_slice(&sum.to_le_bytes());
        let mut page = header(id, META_PAGE, 0, 0);
        page.extend(m);
        page
    }

    /// Places `bytes` at page `id`, fixing the overflow count when it spans several pages.
    fn put_page(file: &mut Vec<u8>, id: u64, mut bytes: Vec<u8>) {
        let pages = bytes.len().div_ceil(PS).max(1);
        bytes[12..16].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
        bytes.resize(pages * PS, 0);
        let at = id as usize * PS;
        if file.len() < at + bytes.len() {
            file.resize(at + bytes.len(), 0);
        }
        file[at..at + bytes.len()].copy_from_slice(&bytes);
    }

    fn big_value() -> Vec<u8> {
        (0..2500u32).map(|i| (i % 251) as u8).collect()
    }

    /// Root bucket {a: page 4 {k1, nested (inline) {deep}}, b (inline) {x, y},
    /// c: branch page 5 -> leaves 6 {m1, m2} and 7 {n-big: 3 pages}, plain value}.
    fn handmade() -> Vec<u8> {
        let bucket = BUCKET_LEAF_FLAG;
        let mut f = Vec::new();
        put_page(&mut f, 0, meta_bytes(0, PS as u32, 3, 10, 4));
        put_page(&mut f, 1, meta_bytes(1, PS as u32, 3, 10, 3));
        put_page(&mut f, 2, header(2, 0x10, 0, 0));
        let b = inline_bucket(&[(0, b"x", b"1".to_vec()), (0, b"y", b"2".to_vec())]);
        let root = leaf_bytes(
            3,
            &[
                (bucket, b"a", bucket_header(4)),
                (bucket, b"b", b),
                (bucket, b"c", bucket_header(5)),
                (0, b"plain", b"value".to_vec()),
            ],
        );
        put_page(&mut f, 3, root);
        let nested = inline_bucket(&[(0, b"deep", b"yes".to_vec())]);
        let a = leaf_bytes(
            4,
            &[(0, b"k1", b"v1".to_vec()), (bucket, b"nested", nested)],
        );
        put_page(&mut f, 4, a);
        put_page(&mut f, 5, branch_bytes(5, &[(b"m1", 6), (b"n", 7)]));
        put_page(
            &mut f,
            6,
            leaf_bytes(6, &[(0, b"m1", b"1".to_vec()), (0, b"m2", b"2".to_vec())]),
        );
        put_page(&mut f, 7, leaf_bytes(7, &[(0, b"n-big", big_value())]));
        assert_eq!(f.len(), 10 * PS);
        f
    }

    fn write_db(dir: &tempfile::TempDir, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join("db");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Opens `bytes` and walks every bucket, returning the first error.
    fn walk(bytes: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(write_db(&dir, bytes))?;
        let mut out = Vec::new();
        let mut todo = vec![db.root()];
        while let Some(bucket) = todo.pop() {
            for item in bucket.iter() {
                let (key, value) = item?;
                match value {
                    Value::Data(v) => out.push((key, v)),
                    Value::Bucket(b) => todo.push(b),
                }
            }
        }
        Ok(out)
    }

    fn set_u64(f: &mut [u8], at: usize, v: u64) {
        f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn handmade_nested_inline_branch_and_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(write_db(&dir, &handmade())).unwrap();
        assert_eq!((db.page_size(), db.meta().txid, db.meta_page()), (PS, 4, 0));
        assert_eq!(
            db.bucket_names().unwrap(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        let root = db.root();
        assert_eq!(root.get(b"plain").unwrap(), Some(b"value".to_vec()));
        assert_eq!(root.get(b"a").unwrap(), None, "a bucket is not a value");
        assert!(
            db.bucket(b"plain").unwrap().is_none(),
            "a value is not a bucket"
        );

        let a = db.bucket(b"a").unwrap().unwrap();
        assert_eq!(a.get(b"k1").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(a.buckets().unwrap(), vec![b"nested".to_vec()]);
        let nested = a.bucket(b"nested").unwrap().unwrap();
        assert_eq!(nested.name(), b"a/nested");
        assert_eq!(nested.get(b"deep").unwrap(), Some(b"yes".to_vec()));
        assert_eq!(nested.get(b"deeper").unwrap(), None);

        let b = db.bucket(b"b").unwrap().unwrap();
        assert_eq!(b.get(b"y").unwrap(), Some(b"2".to_vec()));
        assert_eq!(b.iter().count(), 2);

        let c = db.bucket(b"c").unwrap().unwrap();
        let items: Vec<(Vec<u8>, Vec<u8>)> = c
            .iter()
            .map(|i| match i.unwrap() {
                (k, Value::Data(v)) => (k, v),
                (k, Value::Bucket(_)) => panic!("unexpected bucket {k:?}"),
            })
            .collect();
        let expected = vec![
            (b"m1".to_vec(), b"1".to_vec()),
            (b"m2".to_vec(), b"2".to_vec()),
            (b"n-big".to_vec(), big_value()),
        ];
        assert_eq!(items, expected);
        for (k, v) in &expected {
            assert_eq!(c.get(k).unwrap().as_ref(), Some(v));
        }
        for absent in [&b""[..], b"a", b"m0", b"m3", b"n", b"zzz"] {
            assert_eq!(c.get(absent).unwrap(), None, "{absent:?}");
        }
        // Everything reachable: 1 root value + a:1 + nested:1 + b:2 + c:3.
        assert_eq!(walk(&handmade()).unwrap().len(), 8);
    }

    #[test]
    fn located_reads_agree_with_descents_and_refuse_a_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(write_db(&dir, &handmade())).unwrap();
        // c has a branch root, leaves and an overflow value; b is inline (no location).
        for (name, located) in [(&b"c"[..], true), (b"b", false)] {
            let bucket = db.bucket(name).unwrap().unwrap();
            let mut items = bucket.iter();
            let mut seen = Vec::new();
            while let Some(item) = items.next() {
                let (key, value) = item.unwrap();
                let Value::Data(value) = value else {
                    panic!("no buckets in {name:?}")
                };
                let loc = items.location();
                assert_eq!(loc.is_known(), located, "{key:?}");
                assert_eq!(bucket.get_at(loc, &key).unwrap(), Some(value));
                seen.push((key, loc));
            }
            assert!(seen.len() >= 2);
            if located {
                // The location of one key read as another: an error, never the wrong value.
                let (k0, _) = &seen[0];
                let (_, l1) = seen[1];
                let err = bucket.get_at(l1, k0).unwrap_err().to_string();
                assert!(err.contains("does not hold"), "{err}");
                // Bytes elsewhere on the page, or past it, or a key of another size.
                for far in [
                    Location { offset: 8, ..l1 },
                    Location {
                        offset: 1 << 20,
                        ..l1
                    },
                    Location {
                        ksize: l1.ksize + 1,
                        ..l1
                    },
                ] {
                    assert!(bucket.get_at(far, k0).is_err(), "{far:?}");
                }
            }
        }
        // Beyond the file: the page-range check of every read.
        let c = db.bucket(b"c").unwrap().unwrap();
        let outside = Location {
            pgid: 1 << 40,
            ..Location::default()
        };
        assert!(c.get_at(outside, b"m1").is_err());
    }

    #[test]
    fn split_walks_together_visit_what_one_walk_visits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(write_db(&dir, &handmade())).unwrap();
        // c has a branch root; b is inline (one walk whatever is asked).
        for name in [&b"c"[..], b"b"] {
            let bucket = db.bucket(name).unwrap().unwrap();
            let whole: Vec<_> = bucket.iter().map(|i| i.unwrap().0).collect();
            for parts in 1..=4 {
                let iters = bucket.iter_parts(parts).unwrap();
                assert!(iters.len() <= parts.max(1));
                if name == b"c" && parts > 1 {
                    assert!(iters.len() > 1, "a branch root splits");
                }
                let mut joined = Vec::new();
                for mut it in iters {
                    while let Some(item) = it.next_borrowed() {
                        joined.push(item.unwrap().0.to_vec());
                    }
                }
                assert_eq!(joined, whole, "{name:?} in {parts} parts");
            }
        }
    }

    #[test]
    fn pages_read_through_the_read_ahead_run_are_the_file_s_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_db(&dir, &handmade());
        let file = std::fs::read(&path).unwrap();
        let db = Db::open(&path).unwrap();
        let ps = db.page_size();
        let hw = db.meta().high_water;
        // Forwards, backwards, in strides, and runs of two pages: each from the run or a new one.
        let mut order: Vec<u64> = (2..hw).collect();
        order.extend((2..hw).rev());
        order.extend((2..hw).step_by(3));
        let mut ahead = ReadAhead::default();
        for pgid in order {
            let pages = if pgid + 1 < hw { 2 } else { 1 };
            let mut buf = vec![0u8; pages * ps];
            db.read_pages(&mut buf, pgid, Some(&mut ahead)).unwrap();
            let at = pgid as usize * ps;
            assert_eq!(buf, file[at..at + pages * ps], "page {pgid}");
            // Never past the high-water mark.
            assert!(ahead.first + (ahead.buf.len() / ps) as u64 <= hw);
        }
    }

    #[test]
    fn falls_back_to_the_other_meta_and_names_meta_when_both_are_bad() {
        let mut f = handmade();
        f[PAGE_HEADER_SIZE] ^= 0xff; // magic of meta 0
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(write_db(&dir, &f)).unwrap();
        assert_eq!((db.meta_page(), db.meta().txid), (1, 3));

        f[PS + PAGE_HEADER_SIZE + 20] ^= 1; // root of meta 1: checksum no longer matches
        let err = Db::open(write_db(&dir, &f)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, BboltError::NoValidMeta { .. }), "{msg}");
        assert!(
            msg.contains("meta 0: bad magic") && msg.contains("meta 1: at offset 1024: checksum"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_file_is_an_error() {
        let f = handmade();
        let err = walk(&f[..9 * PS]).unwrap_err();
        assert!(
            matches!(err, BboltError::BadMeta { .. }) && err.to_string().contains("truncated"),
            "{err}"
        );
        let err = walk(&f[..100]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = walk(&f[..50]).unwrap_err();
        assert!(matches!(err, BboltError::NoValidMeta { .. }), "{err}");
        assert!(matches!(
            walk(&[]).unwrap_err(),
            BboltError::NoValidMeta { .. }
        ));
    }

    #[test]
    fn bad_page_size_is_rejected() {
        for ps in [0u32, 100, 1000, 1 << 20, 2048] {
            let mut f = handmade();
            for m in [0, PS] {
                let at = m + PAGE_HEADER_SIZE;
                f[at + 8..at + 12].copy_from_slice(&ps.to_le_bytes());
                let sum = fnv1a64(&f[at..at + META_CHECKSUM_OFFSET]);
                set_u64(&mut f, at + META_CHECKSUM_OFFSET, sum);
            }
            assert!(walk(&f).is_err(), "page size {ps}");
        }
    }

    #[test]
    fn cycles_and_shared_pages_are_errors() {
        // c's branch page points at itself.
        let mut f = handmade();
        set_u64(&mut f, 5 * PS + PAGE_HEADER_SIZE + 8, 5);
        let err = walk(&f).unwrap_err();
        assert!(matches!(err, BboltError::BadTree { .. }), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(write_db(&dir, &f)).unwrap();
        let c = db.bucket(b"c").unwrap().unwrap();
        let err = c.get(b"m1").unwrap_err();
        assert!(err.to_string().contains("deeper than 64"), "{err}");

        // Both branch elements point at the same leaf: keys would repeat.
        let mut f = handmade();
        set_u64(&mut f, 5 * PS + PAGE_HEADER_SIZE + ELEMENT_SIZE + 8, 6);
        let err = walk(&f).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");
    }

    #[test]
    fn bad_page_references_and_headers_are_errors() {
        // Child beyond the high-water mark.
        let mut f = handmade();
        set_u64(&mut f, 5 * PS + PAGE_HEADER_SIZE + 8, 99);
        assert!(matches!(
            walk(&f).unwrap_err(),
            BboltError::PageOutOfRange { pgid: 99, .. }
        ));
        // Child pointing at a meta page.
        set_u64(&mut f, 5 * PS + PAGE_HEADER_SIZE + 8, 1);
        assert!(matches!(
            walk(&f).unwrap_err(),
            BboltError::PageOutOfRange { pgid: 1, .. }
        ));
        // Page header naming another page.
        let mut f = handmade();
        set_u64(&mut f, 6 * PS, 7);
        assert!(matches!(
            walk(&f).unwrap_err(),
            BboltError::BadPage { pgid: 6, .. }
        ));
        // A freelist page used as a tree page.
        let mut f = handmade();
        set_u64(&mut f, 5 * PS + PAGE_HEADER_SIZE + 8, 2);
        let err = walk(&f).unwrap_err();
        assert!(err.to_string().contains("not a branch or leaf"), "{err}");
        // Overflow running past the high-water mark.
        let mut f = handmade();
        f[7 * PS + 12..7 * PS + 16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            walk(&f).unwrap_err(),
            BboltError::BadPage { pgid: 7, .. }
        ));
        // Element count larger than the page.
        let mut f = handmade();
        f[6 * PS + 10..6 * PS + 12].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            walk(&f).unwrap_err(),
            BboltError::BadPage { pgid: 6, .. }
        ));
        // Value size past the page end.
        let mut f = handmade();
        f[6 * PS + PAGE_HEADER_SIZE + 12..][..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            walk(&f).unwrap_err(),
            BboltError::BadTree { pgid: 6, .. }
        ));
        // Bucket header too short for an inline page.
        let mut f = handmade();
        let pos = 3 * PS + PAGE_HEADER_SIZE + ELEMENT_SIZE + 12; // vsize of "b"
        f[pos..pos + 4].copy_from_slice(&8u32.to_le_bytes());
        assert!(walk(&f).is_err());
    }

    #[test]
    fn page_faults_say_what_is_wrong_with_the_page() {
        let fault = |buf: Vec<u8>| Page::new(buf, 9).err().map(|f| f.to_string());
        assert_eq!(
            fault(vec![0; 4]).as_deref(),
            Some("4 bytes cannot hold a page header")
        );
        assert_eq!(
            fault(header(9, 0x04, 0, 0)).as_deref(),
            Some("flags 0x0004: not a branch or leaf page")
        );
        assert_eq!(
            fault(header(9, LEAF_PAGE, 3, 0)).as_deref(),
            Some("3 elements do not fit in 16 bytes")
        );
        assert_eq!(
            fault(header(9, BRANCH_PAGE, 0, 0)).as_deref(),
            Some("branch page without elements")
        );
        let mut leaf = leaf_bytes(9, &[(0, b"k", b"v".to_vec())]);
        let flags_at = PAGE_HEADER_SIZE;
        leaf[flags_at] = 0x10;
        let page = Page::new(leaf.clone(), 9).unwrap();
        assert_eq!(
            page.leaf_element(0).err().map(|f| f.to_string()).as_deref(),
            Some("leaf element 0 has unknown flags 0x10")
        );
        leaf[flags_at] = 0;
        leaf[flags_at + 8] = 200; // ksize past the page end
        let page = Page::new(leaf, 9).unwrap();
        assert!(matches!(
            page.key(0),
            Err(PageFault::PastEnd {
                start: 16,
                from: 32,
                ..
            })
        ));
    }

    #[test]
    fn branch_children_take_the_key_range_between_their_keys() {
        let page = Page::new(branch_bytes(5, &[(b"b", 10), (b"d", 11), (b"f", 12)]), 5).unwrap();
        let frame = Frame {
            page,
            index: 0,
            end: 3,
            lower: Some(b"a".to_vec()),
            upper: Some(b"z".to_vec()),
        };
        let range = |i| frame.child_range(i).unwrap();
        let v = |s: &[u8]| Some(s.to_vec());
        assert_eq!(range(0), (10, v(b"a"), v(b"d")));
        assert_eq!(range(1), (11, v(b"d"), v(b"f")));
        assert_eq!(range(2), (12, v(b"f"), v(b"z")));
    }
}

//! The "newc" cpio format the kernel unpacks an initramfs from (Documentation/driver-api/
//! early-userspace/buffer-format.rst): a 110-byte ASCII header per entry, the NUL-terminated
//! name, the data, each padded to 4 bytes, and a `TRAILER!!!` entry at the end.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes entries in the order given; directories must come before what they hold.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            // Inode numbers only need to be distinct (hard links share one; we write none).
            ino: 1,
            written: 0,
        }
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (mode & 0o7777), 2, &[])
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), 1, data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// A character device node (the kernel needs /dev/console before devtmpfs is mounted, to
    /// give init its standard streams).
    pub fn chardev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry_dev(name, S_IFCHR | (mode & 0o7777), (major, minor))
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        self.write_entry(name, mode, nlink, data, (0, 0))
    }

    fn entry_dev(&mut self, name: &str, mode: u32, rdev: (u32, u32)) -> io::Result<()> {
        self.write_entry(name, mode, 1, &[], rdev)
    }

    fn write_entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let ino = self.ino;
        self.ino += 1;
        let header = format!(
            "{MAGIC}{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            // Fixed times: the same inputs give the same image, byte for byte.
            mtime = 0,
            size = data.len(),
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        debug_assert_eq!(header.len(), 110);
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads entries back: (name, mode, data).
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        loop {
            assert_eq!(&b[..6], b"070701");
            let mode = hex(&b[14..22]);
            let size = hex(&b[54..62]) as usize;
            let namesize = hex(&b[94..102]) as usize;
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            let mut at = 110 + namesize;
            at += (4 - (off + at) % 4) % 4;
            let data = b[at..at + size].to_vec();
            at += size;
            at += (4 - (off + at) % 4) % 4;
            off += at;
            b = &b[at..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn round_trips_and_aligns() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("/bin/x", 0o755, b"hello").unwrap();
        w.symlink("/bin/sh", "x").unwrap();
        w.file("/e", 0o644, b"").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        assert_eq!(entries[0].0, "bin");
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!(entries[1], ("bin/x".into(), 0o100755, b"hello".to_vec()));
        assert_eq!(entries[2], ("bin/sh".into(), 0o120777, b"x".to_vec()));
        assert_eq!(entries[3].2.len(), 0);
    }

    #[test]
    fn same_input_same_bytes() {
        let make = || {
            let mut w = CpioWriter::new(Vec::new());
            w.file("a", 0o644, b"1").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(make(), make());
    }
}

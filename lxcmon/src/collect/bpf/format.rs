//! Field offsets of a tracepoint record, from its tracefs `format` file.

use std::collections::HashMap;

/// One field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parses the `field:` lines of a tracefs `format` file into name -> (offset, size).
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(decl) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = decl.split(';').map(str::trim);
        let Some(decl) = parts.next() else { continue };
        // The name is the last word of the declaration, without an array suffix.
        let Some(name) = decl.split_whitespace().last() else {
            continue;
        };
        let name = name.split('[').next().unwrap_or(name);
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        if let (Some(offset), Some(size)) = (offset, size) {
            out.insert(name.to_string(), Field { offset, size });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIO_QUEUE: &str = "name: block_bio_queue\nID: 2097\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;\n\
\tfield:char rwbs[10];\toffset:28;\tsize:10;\tsigned:0;\n\
\tfield:char comm[16];\toffset:38;\tsize:16;\tsigned:0;\n\n\
print fmt: \"%d,%d %s\", REC->dev\n";

    #[test]
    fn parses_block_bio_queue_format() {
        let f = parse_format(BIO_QUEUE);
        assert_eq!(f["dev"], Field { offset: 8, size: 4 });
        assert_eq!(
            f["nr_sector"],
            Field {
                offset: 24,
                size: 4
            }
        );
        assert_eq!(
            f["rwbs"],
            Field {
                offset: 28,
                size: 10
            }
        );
        assert_eq!(
            f["comm"],
            Field {
                offset: 38,
                size: 16
            }
        );
        assert_eq!(f.len(), 7);
    }
}

//! Checks made before and beside parsing: the nesting bound and the writable paths.

/// Checks of the paths the agent writes, without writing anything.
pub(super) mod paths {
    use rustix::fs::{access, Access};
    use std::path::Path;

    /// Why `file` could not be created or replaced by a rename from its directory, if so.
    pub(in crate::config) fn unwritable_file(file: &Path) -> Option<String> {
        if file.is_dir() {
            return Some("is a directory".into());
        }
        let dir = match file.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => return Some("has no file name".into()),
        };
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("the directory {} does not exist", dir.display()))
            }
            Err(e) => Some(format!("the directory {}: {e}", dir.display())),
            Ok(m) if !m.is_dir() => Some(format!("{} is not a directory", dir.display())),
            // access(2) also reports a read-only filesystem (EROFS), which root meets too.
            Ok(_) => access(dir, Access::WRITE_OK | Access::EXEC_OK)
                .err()
                .map(|e| format!("the directory {} is not writable: {e}", dir.display())),
        }
    }
}

/// The pre-scan that bounds nesting before the YAML parser sees the text.
pub(super) mod limits {
    /// The first line where block indentation, compact `- ` entries and flow brackets together
    /// nest deeper than `max`. It may overcount (it does not parse), never undercount, so a
    /// document it passes nests at most `max` deep. Block scalars (`|`, `>`) are skipped;
    /// quotes and comments are honoured.
    pub(in crate::config) fn too_deep(text: &str, max: usize) -> Option<usize> {
        let mut indents: Vec<usize> = Vec::new();
        let mut flow = 0usize;
        let mut quote: Option<char> = None;
        let mut scalar_above: Option<usize> = None;
        for (n, line) in text.lines().enumerate() {
            let indent = line.len() - line.trim_start_matches(' ').len();
            let body = &line[indent..];
            if let Some(parent) = scalar_above {
                if body.is_empty() || indent > parent {
                    continue;
                }
                scalar_above = None;
            }
            if quote.is_none() && flow == 0 && !body.is_empty() && !body.starts_with('#') {
                while indents.last().is_some_and(|&i| i >= indent) {
                    indents.pop();
                }
                indents.push(indent);
            }
            let mut block = indents.len();
            let mut rest = body;
            while quote.is_none() && flow == 0 {
                match rest.strip_prefix('-').or_else(|| rest.strip_prefix('?')) {
                    Some(r) if r.is_empty() || r.starts_with(' ') => {
                        block += 1;
                        rest = r.trim_start_matches(' ');
                    }
                    _ => break,
                }
            }
            let mut prev = ' ';
            let mut escaped = false;
            for c in rest.chars() {
                match quote {
                    Some('"') if escaped => escaped = false,
                    Some('"') if c == '\\' => escaped = true,
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None => match c {
                        '#' if prev == ' ' || prev == '\t' => break,
                        // A quote opens a scalar only where one starts (`it's` is plain).
                        '"' | '\'' if matches!(prev, ' ' | '\t' | '[' | '{' | ',' | ':') => {
                            quote = Some(c)
                        }
                        '[' | '{' => flow += 1,
                        ']' | '}' => flow = flow.saturating_sub(1),
                        _ => {}
                    },
                }
                if block + flow > max {
                    return Some(n + 1);
                }
                prev = c;
            }
            if block + flow > max {
                return Some(n + 1);
            }
            let tail = rest.split(" #").next().unwrap_or("").trim_end();
            if quote.is_none()
                && flow == 0
                && tail
                    .rsplit(' ')
                    .next()
                    .is_some_and(|w| w.starts_with('|') || w.starts_with('>'))
            {
                scalar_above = Some(indent);
            }
        }
        None
    }
}

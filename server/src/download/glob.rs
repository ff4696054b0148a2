//! `fnmatch`-style include patterns (`*`, `?`), as `huggingface_hub`'s `allow_patterns` use:
//! `*` also crosses `/`, so `*.json` matches nested files too.

/// Whether `path` matches any of `patterns` (an empty list matches everything).
pub fn matches_any(patterns: &[String], path: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| matches(p, path))
}

/// Whether `path` matches `pattern`; iterative with one backtrack point (no blow-up on `*a*a*a`).
pub fn matches(pattern: &str, path: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = path.chars().collect();
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_semantics() {
        assert!(matches("*.json", "config.json"));
        assert!(matches("*.json", "sub/dir/config.json"));
        assert!(matches("tokenizer*", "tokenizer_config.json"));
        assert!(matches(
            "model-?????-of-*.safetensors",
            "model-00001-of-00006.safetensors"
        ));
        assert!(!matches("*.json", "config.json.bak"));
        assert!(!matches("tokenizer*", "sub/tokenizer.json"));
        assert!(matches("*", ""));
        assert!(!matches("a*b*c", "abxx"));
        assert!(matches_any(&[], "anything"));
    }
}

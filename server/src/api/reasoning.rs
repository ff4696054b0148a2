//! Splitting generated text into `reasoning_content` and `content` at `</think>`.
//!
//! With reasoning on, the prompt ends in `<think>\n`, so the model writes its
//! reasoning, then `</think>`, then the answer. The tag can arrive split across
//! deltas, so a tail that could start it is held back until it is resolved.

const OPEN_TAG: &str = "<think>";
const CLOSE_TAG: &str = "</think>";

/// Text released by one step, for each field.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug)]
pub struct ReasoningSplitter {
    state: State,
    /// Text received but not yet released (a possible tag prefix).
    pending: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before any text: a leading `<think>` (if the template did not put it
    /// in the prompt) is dropped.
    Start,
    Reasoning,
    /// After `</think>`, until the first non-whitespace character of the answer.
    AnswerStart,
    Answer,
    /// Reasoning off: everything is content, as generated.
    Passthrough,
}

impl ReasoningSplitter {
    pub fn new(reasoning_enabled: bool) -> Self {
        ReasoningSplitter {
            state: if reasoning_enabled {
                State::Start
            } else {
                State::Passthrough
            },
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> Split {
        let mut out = Split::default();
        match self.state {
            State::Passthrough | State::Answer => out.content.push_str(delta),
            State::AnswerStart => self.push_answer_start(delta, &mut out),
            State::Start | State::Reasoning => {
                self.pending.push_str(delta);
                self.drain_reasoning(&mut out);
            }
        }
        out
    }

    /// Release held-back text at the end of generation.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.pending);
        let mut out = Split::default();
        match self.state {
            State::Start | State::Reasoning => out.reasoning = rest,
            _ => out.content = rest,
        }
        out
    }

    fn drain_reasoning(&mut self, out: &mut Split) {
        if self.state == State::Start {
            let trimmed = self.pending.trim_start();
            if trimmed.len() < OPEN_TAG.len() && OPEN_TAG.starts_with(trimmed) {
                return; // could still be a leading `<think>`
            }
            if let Some(rest) = trimmed.strip_prefix(OPEN_TAG) {
                self.pending = rest.to_owned();
            }
            self.state = State::Reasoning;
        }
        if let Some(at) = self.pending.find(CLOSE_TAG) {
            out.reasoning.push_str(&self.pending[..at]);
            let answer = self.pending[at + CLOSE_TAG.len()..].to_owned();
            self.pending.clear();
            self.state = State::AnswerStart;
            self.push_answer_start(&answer, out);
            return;
        }
        let keep = longest_suffix_prefix(&self.pending, CLOSE_TAG);
        let split = self.pending.len() - keep;
        out.reasoning.push_str(&self.pending[..split]);
        self.pending.drain(..split);
    }

    fn push_answer_start(&mut self, delta: &str, out: &mut Split) {
        let answer = delta.trim_start();
        if !answer.is_empty() {
            self.state = State::Answer;
            out.content.push_str(answer);
        }
    }
}

/// Split a whole generation. Returns `(reasoning, content)`; reasoning is
/// `None` when reasoning is off. If `</think>` never came (e.g. `max_tokens`
/// ran out while reasoning), all text is reasoning and content is empty.
pub fn split_reasoning(text: &str, reasoning_enabled: bool) -> (Option<String>, String) {
    let mut splitter = ReasoningSplitter::new(reasoning_enabled);
    let mut head = splitter.push(text);
    let tail = splitter.finish();
    head.reasoning.push_str(&tail.reasoning);
    head.content.push_str(&tail.content);
    let reasoning = reasoning_enabled.then(|| head.reasoning.trim().to_owned());
    (reasoning, head.content)
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn longest_suffix_prefix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .filter(|&n| text.is_char_boundary(text.len() - n))
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(enabled: bool, deltas: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new(enabled);
        let (mut reasoning, mut content) = (String::new(), String::new());
        for d in deltas {
            let out = s.push(d);
            reasoning += &out.reasoning;
            content += &out.content;
        }
        let out = s.finish();
        (reasoning + &out.reasoning, content + &out.content)
    }

    #[test]
    fn off_passes_text_through_untouched() {
        assert_eq!(
            stream(false, &["<think>x</think>", " A cat."]),
            ("".into(), "<think>x</think> A cat.".into())
        );
        assert_eq!(split_reasoning(" A cat.", false), (None, " A cat.".into()));
    }

    #[test]
    fn splits_at_close_tag_and_trims_answer_start() {
        assert_eq!(
            split_reasoning("Looks like a cat.\n</think>\n\nA cat.", true),
            (Some("Looks like a cat.".into()), "A cat.".into())
        );
    }

    #[test]
    fn tag_split_across_deltas() {
        assert_eq!(
            stream(true, &["hmm </", "thi", "nk>", "\n", "  ", "A cat", "."]),
            ("hmm ".into(), "A cat.".into())
        );
        assert_eq!(
            stream(true, &["a <", "b", "</think>c"]),
            ("a <b".into(), "c".into())
        );
    }

    #[test]
    fn leading_open_tag_is_dropped() {
        assert_eq!(
            stream(true, &["<th", "ink>\nwhy", "</think>ok"]),
            ("\nwhy".into(), "ok".into())
        );
        assert_eq!(stream(true, &["<b>bold"]), ("<b>bold".into(), "".into()));
    }

    #[test]
    fn no_close_tag_means_all_reasoning() {
        assert_eq!(
            split_reasoning("still thinking </thi", true),
            (Some("still thinking </thi".into()), String::new())
        );
    }

    #[test]
    fn multibyte_text_is_safe() {
        assert_eq!(stream(true, &["é<", "/think>ü"]), ("é".into(), "ü".into()));
    }
}

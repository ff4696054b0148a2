//! Whether a chat asks the model to reason before answering.
//!
//! Nemotron Nano v2 VL reasons by default; a `/no_think` in a system or user
//! message turns it off and `/think` turns it back on. When several flags
//! appear, the last one (in message order, then text order) wins — the same
//! rule as the built-in chat template, so the API's `</think>` split and the
//! prompt always agree.

use crate::engine::{ChatMessage, ContentPart, Role};

const THINK: &str = "/think";
const NO_THINK: &str = "/no_think";

/// True unless the last reasoning flag in a system or user message is `/no_think`.
pub fn reasoning_enabled(messages: &[ChatMessage]) -> bool {
    let mut enabled = true;
    let flagged_text = messages
        .iter()
        .filter(|m| matches!(m.role, Role::System | Role::User))
        .flat_map(|m| m.parts.iter())
        .filter_map(|part| match part {
            ContentPart::Text(text) => Some(text.as_str()),
            ContentPart::Image(_) => None,
        });
    for text in flagged_text {
        if let Some(last) = last_flag(text) {
            enabled = last;
        }
    }
    enabled
}

/// The last flag in `text`: `Some(true)` for `/think`, `Some(false)` for `/no_think`.
/// `/no_think` does not contain `/think`, so the two never overlap.
fn last_flag(text: &str) -> Option<bool> {
    match (text.rfind(THINK), text.rfind(NO_THINK)) {
        (None, None) => None,
        (Some(_), None) => Some(true),
        (None, Some(_)) => Some(false),
        (Some(think), Some(no_think)) => Some(think > no_think),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn message(role: Role, text: &str) -> ChatMessage {
        ChatMessage {
            role,
            parts: vec![ContentPart::Text(text.into())],
        }
    }

    #[test]
    fn on_by_default() {
        assert!(reasoning_enabled(&[]));
        assert!(reasoning_enabled(&[message(Role::User, "Caption this")]));
    }

    #[test]
    fn nv_ingest_system_prompts() {
        let user = message(Role::User, "Caption the content of this image:");
        assert!(!reasoning_enabled(&[
            message(Role::System, "/no_think"),
            user.clone()
        ]));
        assert!(reasoning_enabled(&[message(Role::System, "/think"), user]));
    }

    #[test]
    fn last_flag_wins_across_and_within_messages() {
        assert!(reasoning_enabled(&[
            message(Role::System, "/no_think"),
            message(Role::User, "Why? /think"),
        ]));
        assert!(!reasoning_enabled(&[message(
            Role::User,
            "/think then /no_think"
        )]));
        assert!(reasoning_enabled(&[message(
            Role::User,
            "/no_think, no: /think"
        )]));
    }

    #[test]
    fn assistant_text_and_images_are_ignored() {
        let messages = [
            message(Role::System, "/no_think"),
            message(Role::Assistant, "/think"),
            ChatMessage {
                role: Role::User,
                parts: vec![ContentPart::Image(Arc::new(b"/think".to_vec()))],
            },
        ];
        assert!(!reasoning_enabled(&messages));
    }

    #[test]
    fn flags_in_any_text_part_count() {
        let messages = [ChatMessage {
            role: Role::User,
            parts: vec![
                ContentPart::Text("Describe".into()),
                ContentPart::Image(Arc::new(Vec::new())),
                ContentPart::Text("/no_think".into()),
            ],
        }];
        assert!(!reasoning_enabled(&messages));
    }
}

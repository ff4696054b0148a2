//! Chat-template rendering with minijinja, as Hugging Face `apply_chat_template` does.
//!
//! The checkpoint's own template wins (`chat_template.jinja`, then
//! `tokenizer_config.json`'s `chat_template`); the built-in template of
//! model.md §6.1 is the fallback. Message content is passed as a list of parts
//! in client order (`{"type": "text", "text": ...}` / `{"type": "image"}`), so
//! the template decides where image placeholders go (model.md §11.1).

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, value::Serde};
use serde_json::{Value as Json, json};

use crate::engine::{ChatMessage, ContentPart, Role};

const BUILTIN_TEMPLATE: &str = include_str!("builtin_template.jinja");
const TEMPLATE_NAME: &str = "chat";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("reading {file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("parsing {file}: {message}")]
    Parse { file: String, message: String },
    #[error("chat template {source_name}: {message}")]
    Compile {
        source_name: String,
        message: String,
    },
    #[error("rendering the chat template: {0}")]
    Render(String),
}

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for logs and errors.
    pub source_name: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_name", &self.source_name)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Load the template a checkpoint directory defines, or the built-in one.
    pub fn load(model_dir: &Path) -> Result<Self, TemplateError> {
        let config = read_tokenizer_config(model_dir)?;
        let token = |key: &str| special_token_string(config.get(key)).unwrap_or_default();
        let (source, source_name) = match read_template_file(model_dir)? {
            Some(source) => (source, "chat_template.jinja".to_owned()),
            None => match template_from_config(&config) {
                Some(source) => (source, "tokenizer_config.json".to_owned()),
                None => (BUILTIN_TEMPLATE.to_owned(), "built-in".to_owned()),
            },
        };
        Self::from_source(source, source_name, token("bos_token"), token("eos_token"))
    }

    /// The built-in template of model.md §6.1.
    pub fn builtin() -> Self {
        Self::from_source(
            BUILTIN_TEMPLATE.to_owned(),
            "built-in".to_owned(),
            "<s>".to_owned(),
            "<SPECIAL_12>".to_owned(),
        )
        .expect("the built-in chat template compiles")
    }

    fn from_source(
        source: String,
        source_name: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, TemplateError> {
        let compile_error = |e: minijinja::Error| TemplateError::Compile {
            source_name: source_name.clone(),
            message: e.to_string(),
        };
        let mut env = Environment::new();
        // Hugging Face compiles chat templates with trim_blocks and lstrip_blocks.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(compile_error)?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<(), _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(compile_error)?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            source_name,
        })
    }

    /// Render a conversation with the generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let messages: Vec<Json> = messages.iter().map(message_json).collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => Serde(messages),
                add_generation_prompt => true,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| TemplateError::Render(e.to_string()))
    }
}

fn message_json(message: &ChatMessage) -> Json {
    let role = match message.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    let parts: Vec<Json> = message
        .parts
        .iter()
        .map(|part| match part {
            ContentPart::Text(text) => json!({"type": "text", "text": text}),
            ContentPart::Image(_) => json!({"type": "image"}),
        })
        .collect();
    json!({"role": role, "content": parts})
}

fn read_tokenizer_config(model_dir: &Path) -> Result<Json, TemplateError> {
    let path = model_dir.join("tokenizer_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Json::Null),
        Err(source) => {
            return Err(TemplateError::Io {
                file: "tokenizer_config.json".into(),
                source,
            });
        }
    };
    serde_json::from_str(&text).map_err(|e| TemplateError::Parse {
        file: "tokenizer_config.json".into(),
        message: e.to_string(),
    })
}

fn read_template_file(model_dir: &Path) -> Result<Option<String>, TemplateError> {
    match std::fs::read_to_string(model_dir.join("chat_template.jinja")) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TemplateError::Io {
            file: "chat_template.jinja".into(),
            source,
        }),
    }
}

/// `chat_template` is either a string or a list of `{name, template}` (use "default").
fn template_from_config(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(source) => Some(source.clone()),
        Json::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// Special tokens are written either as strings or as `{"content": ...}` objects.
fn special_token_string(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn text(role: Role, t: &str) -> ChatMessage {
        ChatMessage {
            role,
            parts: vec![ContentPart::Text(t.into())],
        }
    }

    fn image() -> ContentPart {
        ContentPart::Image(Arc::new(Vec::new()))
    }

    #[test]
    fn nv_ingest_request_renders_reasoning_off() {
        let messages = vec![
            text(Role::System, "/no_think"),
            ChatMessage {
                role: Role::User,
                parts: vec![
                    ContentPart::Text("Caption the content of this image:".into()),
                    image(),
                ],
            },
        ];
        let rendered = ChatTemplate::builtin().render(&messages).unwrap();
        assert_eq!(
            rendered,
            "<SPECIAL_10>System\n\n<SPECIAL_11>User\n<image>\nCaption the content of this image:\n\
             <SPECIAL_11>Assistant\n<think></think>"
        );
    }

    #[test]
    fn reasoning_defaults_on_and_last_flag_wins() {
        let template = ChatTemplate::builtin();
        let on = template.render(&[text(Role::User, "Hello")]).unwrap();
        assert_eq!(
            on,
            "<SPECIAL_10>System\n\n<SPECIAL_11>User\nHello\n<SPECIAL_11>Assistant\n<think>\n"
        );
        let flipped = template
            .render(&[
                text(Role::System, "/no_think"),
                text(Role::User, "Why? /think"),
            ])
            .unwrap();
        assert!(flipped.ends_with("<think>\n"), "{flipped:?}");
        assert!(flipped.contains("User\nWhy?\n"), "{flipped:?}");
        let off = template
            .render(&[text(Role::User, "/think then /no_think")])
            .unwrap();
        assert!(off.ends_with("<think></think>"), "{off:?}");
    }

    #[test]
    fn assistant_history_keeps_only_the_answer() {
        let rendered = ChatTemplate::builtin()
            .render(&[
                text(Role::User, "Hi"),
                text(Role::Assistant, "<think>hmm</think> Hello!"),
                text(Role::User, "Bye /no_think"),
            ])
            .unwrap();
        assert!(
            rendered
                .contains("<SPECIAL_11>Assistant\nHello!\n<SPECIAL_12>\n<SPECIAL_11>User\nBye\n"),
            "{rendered:?}"
        );
    }

    #[test]
    fn template_errors_name_their_source() {
        let err = ChatTemplate::from_source(
            "{% if %}".into(),
            "tokenizer_config.json".into(),
            String::new(),
            String::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn raise_exception_surfaces_as_render_error() {
        let t = ChatTemplate::from_source(
            "{{ raise_exception('no tools here') }}".into(),
            "test".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t.render(&[]).unwrap_err();
        assert!(err.to_string().contains("no tools here"), "{err}");
    }
}

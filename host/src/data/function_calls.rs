//! A generated task: turning requests into function-call JSON. It is the demo's dataset —
//! small, checkable (a call is right or wrong), and not learnable without training.

use crate::model::tokenizer::Message;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A request and the call that answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallExample {
    pub request: String,
    pub call: serde_json::Value,
}

impl CallExample {
    /// As a chat: system instruction, user request, assistant call.
    pub fn messages(&self) -> Vec<Message> {
        let mut m = self.prompt();
        m.push(Message::new("assistant", &self.call.to_string()));
        m
    }

    /// The conversation up to the assistant's turn.
    pub fn prompt(&self) -> Vec<Message> {
        vec![Message::new("system", SYSTEM), Message::new("user", &self.request)]
    }
}

/// The instruction every example carries.
pub const SYSTEM: &str = "Answer with one function call as JSON.";

const CITIES: &[&str] = &["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito", "Dakar", "Hanoi", "Perth", "Austin", "Zurich", "Seoul", "Nairobi"];
const DAYS: &[&str] = &["today", "tomorrow"];
const NAMES: &[&str] = &["Ana", "Ben", "Chloe", "Dev", "Emma", "Felix", "Grace", "Hugo", "Ines", "Jack"];
const SUBJECTS: &[&str] = &["the budget", "lunch", "the trip", "the report", "the launch", "the meeting"];
const CURRENCIES: &[&str] = &["USD", "EUR", "JPY", "GBP", "CHF", "INR"];
const ARTISTS: &[&str] = &["Miles Davis", "Bach", "Adele", "Queen", "Nina Simone", "Daft Punk", "Bjork"];

/// `n` seeded examples over five functions with varied phrasings.
pub fn generate(n: usize, seed: u64) -> Vec<CallExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| one(&mut rng)).collect()
}

fn one(rng: &mut ChaCha8Rng) -> CallExample {
    let pick = |rng: &mut ChaCha8Rng, xs: &[&str]| xs.choose(rng).copied().unwrap_or_default().to_owned();
    let (request, call) = match rng.random_range(0..5) {
        0 => {
            let (city, day) = (pick(rng, CITIES), pick(rng, DAYS));
            let forms = [
                format!("What is the weather in {city} {day}?"),
                format!("Will it rain in {city} {day}?"),
                format!("Forecast for {city} {day}, please."),
            ];
            (pick_form(rng, &forms), serde_json::json!({"name": "get_weather", "arguments": {"city": city, "day": day}}))
        }
        1 => {
            let minutes = rng.random_range(1..=90);
            let forms = [format!("Set a timer for {minutes} minutes."), format!("Start a {minutes} minute timer."), format!("Remind me in {minutes} minutes.")];
            (pick_form(rng, &forms), serde_json::json!({"name": "set_timer", "arguments": {"minutes": minutes}}))
        }
        2 => {
            let (to, subject) = (pick(rng, NAMES), pick(rng, SUBJECTS));
            let forms = [format!("Email {to} about {subject}."), format!("Send {to} a mail about {subject}."), format!("Write to {to} regarding {subject}.")];
            (pick_form(rng, &forms), serde_json::json!({"name": "send_email", "arguments": {"to": to, "subject": subject}}))
        }
        3 => {
            let amount = rng.random_range(1..=500) * 5;
            let from = pick(rng, CURRENCIES);
            let to = CURRENCIES.iter().copied().filter(|c| *c != from).collect::<Vec<_>>().choose(rng).copied().unwrap_or("USD").to_owned();
            let forms = [format!("Convert {amount} {from} to {to}."), format!("How much is {amount} {from} in {to}?")];
            (pick_form(rng, &forms), serde_json::json!({"name": "convert_currency", "arguments": {"amount": amount, "from": from, "to": to}}))
        }
        _ => {
            let artist = pick(rng, ARTISTS);
            let forms = [format!("Play something by {artist}."), format!("Put on {artist}."), format!("I want to hear {artist}.")];
            (pick_form(rng, &forms), serde_json::json!({"name": "play_music", "arguments": {"artist": artist}}))
        }
    };
    CallExample { request, call }
}

/// A plausible wrong answer to `e` (for preference pairs): the right arguments under another
/// of the five functions' names, or the right function with one argument changed to a value
/// of the same kind (another city, name, currency…, or another number).
pub fn wrong_call(e: &CallExample, rng: &mut ChaCha8Rng) -> serde_json::Value {
    let mut call = e.call.clone();
    let name = call["name"].as_str().unwrap_or_default().to_owned();
    if rng.random_bool(0.5) {
        let others: Vec<&str> = FUNCTIONS.iter().copied().filter(|f| *f != name).collect();
        call["name"] = serde_json::Value::from(others.choose(rng).copied().unwrap_or("get_weather"));
        return call;
    }
    let Some(args) = call["arguments"].as_object_mut() else { return call };
    let keys: Vec<String> = args.keys().cloned().collect();
    let Some(key) = keys.choose(rng).cloned() else { return call };
    let old = args[&key].clone();
    let pool: &[&str] = match key.as_str() {
        "city" => CITIES,
        "day" => DAYS,
        "to" if name == "send_email" => NAMES,
        "subject" => SUBJECTS,
        "from" | "to" => CURRENCIES,
        _ => ARTISTS,
    };
    args[&key] = match old.as_i64() {
        Some(n) => serde_json::Value::from(n + rng.random_range(1..=9)),
        None => {
            let choices: Vec<&str> = pool.iter().copied().filter(|v| old.as_str() != Some(v)).collect();
            serde_json::Value::from(choices.choose(rng).copied().unwrap_or("?"))
        }
    };
    call
}

const FUNCTIONS: &[&str] = &["get_weather", "set_timer", "send_email", "convert_currency", "play_music"];

fn pick_form(rng: &mut ChaCha8Rng, forms: &[String]) -> String {
    forms.choose(rng).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_seeded_and_calls_are_json_objects() {
        let a = generate(50, 7);
        assert_eq!(a, generate(50, 7));
        assert_ne!(a, generate(50, 8));
        assert!(a.iter().all(|e| e.call["name"].is_string() && e.call["arguments"].is_object()));
        let names: std::collections::BTreeSet<&str> = a.iter().map(|e| e.call["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), 5, "all five functions appear");
    }

    #[test]
    fn a_prompt_record_with_the_system_message_renders_as_the_sft_chat() {
        // The preference stage's pairs go through `data.system` + prompt string; they must
        // be the same conversation the SFT stage trained on.
        for e in generate(20, 5) {
            let m = crate::data::tokenize::prompt_messages(Some(SYSTEM), &e.request, Some(&e.call.to_string()));
            assert_eq!(m, e.messages());
            assert_eq!(crate::data::tokenize::prompt_messages(Some(SYSTEM), &e.request, None), e.prompt());
        }
    }

    #[test]
    fn wrong_calls_differ_from_the_right_one_in_one_place() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for e in generate(200, 3) {
            let w = wrong_call(&e, &mut rng);
            assert_ne!(w, e.call, "{}", e.request);
            let same_name = w["name"] == e.call["name"];
            let changed = e.call["arguments"].as_object().unwrap().iter().filter(|(k, v)| w["arguments"][k.as_str()] != **v).count();
            assert_eq!((same_name, changed), if same_name { (true, 1) } else { (false, 0) }, "{e:?} → {w}");
        }
    }
}

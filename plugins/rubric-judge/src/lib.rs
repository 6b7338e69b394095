//! A rubric judge: asks the host's language model to grade the response on a 1–10 rubric
//! (against the reference when the sample has one) with a fixed prompt, reads the first integer
//! of the reply as the grade `n`, and scores `n / 10` with the reply as the rationale. A reply
//! without an integer in 1..=10 is an error for that sample only.

use ftx_plugin_api::judge::{complete, export_judge, Judge, Judgement, Sample};

/// Tokens the grader may use: the grade first, then one or two sentences.
const MAX_TOKENS: u32 = 96;

const RUBRIC: &str = "You are a strict grader. Grade the RESPONSE to the PROMPT on a scale of 1 to 10:
10 = fully correct and complete; 7 = correct with minor flaws; 4 = partly correct; 1 = wrong, off-topic or empty.";

struct Rubric;

/// The grading request for one sample.
fn request(s: &Sample) -> String {
    let reference = match &s.reference {
        Some(r) => format!("REFERENCE (a correct answer; judge the response against it):\n{r}\n\n"),
        None => "There is no reference answer: judge correctness and helpfulness yourself.\n\n".into(),
    };
    format!(
        "{RUBRIC}\n\nPROMPT:\n{}\n\nRESPONSE:\n{}\n\n{reference}Reply with \"Score: N\" (N from 1 to 10) followed by one sentence explaining the grade.",
        s.prompt, s.response
    )
}

/// The first run of ASCII digits in `text`, as a number.
fn first_integer(text: &str) -> Option<u64> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits: String = text[start..].chars().take_while(char::is_ascii_digit).take(6).collect();
    digits.parse().ok()
}

fn grade(s: &Sample) -> Result<Judgement, String> {
    let reply = complete(&request(s), MAX_TOKENS)?;
    match first_integer(&reply) {
        Some(n @ 1..=10) => Ok(Judgement { score: n as f32 / 10.0, rationale: reply.trim().to_owned() }),
        Some(n) => Err(format!("the grader's reply gives {n}, outside the 1-10 rubric: {:?}", clip(&reply))),
        None => Err(format!("the grader's reply has no grade: {:?}", clip(&reply))),
    }
}

/// At most 200 characters of a reply, for error messages.
fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

impl Judge for Rubric {
    fn judge(samples: Vec<Sample>) -> Vec<Result<Judgement, String>> {
        samples.iter().map(grade).collect()
    }
}

export_judge!(Rubric);

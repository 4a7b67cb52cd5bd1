//! The calculator a model calls between tool tokens: exact decimal arithmetic (`+ - * / % **`,
//! parentheses, unary signs) on up to 28 significant digits, and nothing else. It never runs
//! code, and every input ends in bounded time and memory: the expression's length, its nesting
//! and each number's digits are capped, and every operation is checked, so `1/0`, `10**10**10`
//! or a 2,000-digit number come back as an error string the model reads, never a crash.

use rust_decimal::prelude::*;
use rust_decimal::MathematicalOps;

/// Longest expression evaluated, in characters.
pub const MAX_EXPRESSION: usize = 200;
/// Deepest nesting of parentheses and unary signs.
const MAX_DEPTH: usize = 32;
/// Largest exponent magnitude (larger ones overflow anyway; this keeps the work bounded).
const MAX_EXPONENT: i64 = 4096;

/// Evaluates `expression`; the error is a short sentence for the model to read.
pub fn evaluate(expression: &str) -> Result<Decimal, String> {
    let chars = expression.chars().count();
    if chars > MAX_EXPRESSION {
        return Err(format!(
            "error: the expression is {chars} characters, more than {MAX_EXPRESSION}"
        ));
    }
    let tokens = lex(expression)?;
    if tokens.is_empty() {
        return Err("error: empty expression".into());
    }
    let mut p = Parser { tokens, pos: 0 };
    let value = p.sum(0)?;
    match p.tokens.get(p.pos) {
        None => Ok(value.normalize()),
        Some(t) => Err(format!("error: unexpected {}", t.describe())),
    }
}

/// The text the model is shown: the value, or the error.
pub fn answer(expression: &str) -> String {
    match evaluate(expression) {
        Ok(v) => v.to_string(),
        Err(e) => e,
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Number(Decimal),
    Op(char),
    Power,
    Open,
    Close,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Number(n) => format!("number {n}"),
            Token::Op(c) => format!("'{c}'"),
            Token::Power => "'**'".into(),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
        }
    }
}

fn lex(s: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '0'..='9' | '.' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || chars[i] == '.'
                        || chars[i] == ','
                        || chars[i] == '_')
                {
                    i += 1;
                }
                let text: String = chars[start..i]
                    .iter()
                    .filter(|c| **c != ',' && **c != '_')
                    .collect();
                let digits = text.chars().filter(char::is_ascii_digit).count();
                if digits > 28 {
                    return Err(format!(
                        "error: a number has {digits} digits; the calculator takes at most 28"
                    ));
                }
                let n = Decimal::from_str_exact(&text)
                    .map_err(|_| format!("error: '{text}' is not a number"))?;
                out.push(Token::Number(n));
            }
            '*' if chars.get(i + 1) == Some(&'*') => {
                out.push(Token::Power);
                i += 2;
            }
            '^' => {
                out.push(Token::Power);
                i += 1;
            }
            '+' | '-' | '*' | '/' | '%' => {
                out.push(Token::Op(c));
                i += 1;
            }
            '×' | 'x' => {
                out.push(Token::Op('*'));
                i += 1;
            }
            '÷' => {
                out.push(Token::Op('/'));
                i += 1;
            }
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            '=' if chars[i + 1..].iter().all(|c| c.is_whitespace()) => i = chars.len(),
            _ => return Err(format!("error: the calculator does not know '{c}'")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

const OVERFLOW: &str = "error: the result is too large";

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn deeper(depth: usize) -> Result<usize, String> {
        if depth >= MAX_DEPTH {
            return Err(format!("error: nested more than {MAX_DEPTH} deep"));
        }
        Ok(depth + 1)
    }

    fn sum(&mut self, depth: usize) -> Result<Decimal, String> {
        let mut v = self.product(depth)?;
        while let Some(Token::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            let r = self.product(depth)?;
            v = if op == '+' {
                v.checked_add(r)
            } else {
                v.checked_sub(r)
            }
            .ok_or(OVERFLOW)?;
        }
        Ok(v)
    }

    fn product(&mut self, depth: usize) -> Result<Decimal, String> {
        let mut v = self.unary(depth)?;
        while let Some(Token::Op(op @ ('*' | '/' | '%'))) = self.peek().cloned() {
            self.pos += 1;
            let r = self.unary(depth)?;
            if op != '*' && r.is_zero() {
                return Err("error: division by zero".into());
            }
            v = match op {
                '*' => v.checked_mul(r),
                '/' => v.checked_div(r),
                _ => v.checked_rem(r),
            }
            .ok_or(OVERFLOW)?;
        }
        Ok(v)
    }

    fn unary(&mut self, depth: usize) -> Result<Decimal, String> {
        match self.peek() {
            Some(Token::Op('-')) => {
                self.pos += 1;
                Ok(-self.unary(Self::deeper(depth)?)?)
            }
            Some(Token::Op('+')) => {
                self.pos += 1;
                self.unary(Self::deeper(depth)?)
            }
            _ => self.power(depth),
        }
    }

    /// `a ** b`, right-associative, binding tighter than a unary sign on its left.
    fn power(&mut self, depth: usize) -> Result<Decimal, String> {
        let base = self.atom(depth)?;
        if self.peek() != Some(&Token::Power) {
            return Ok(base);
        }
        self.pos += 1;
        let exp = self.unary(Self::deeper(depth)?)?;
        if !exp.fract().is_zero() {
            return Err("error: only whole-number powers are supported".into());
        }
        let e = exp
            .to_i64()
            .filter(|e| e.abs() <= MAX_EXPONENT)
            .ok_or(OVERFLOW)?;
        if base.is_zero() && e < 0 {
            return Err("error: division by zero".into());
        }
        base.checked_powi(e).ok_or_else(|| OVERFLOW.to_string())
    }

    fn atom(&mut self, depth: usize) -> Result<Decimal, String> {
        match self.peek().cloned() {
            Some(Token::Number(n)) => {
                self.pos += 1;
                Ok(n)
            }
            Some(Token::Open) => {
                self.pos += 1;
                let v = self.sum(Self::deeper(depth)?)?;
                if self.peek() != Some(&Token::Close) {
                    return Err("error: a '(' is not closed".into());
                }
                self.pos += 1;
                Ok(v)
            }
            Some(t) => Err(format!("error: unexpected {}", t.describe())),
            None => Err("error: the expression ends too early".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_exact_and_follows_precedence() {
        assert_eq!(answer("12 + 30"), "42");
        assert_eq!(answer("2 + 3 * 4"), "14");
        assert_eq!(answer("(2 + 3) * 4"), "20");
        assert_eq!(answer("0.1 + 0.2"), "0.3");
        assert_eq!(answer("-2 ** 2"), "-4");
        assert_eq!(answer("2 ** 3 ** 2"), "512");
        assert_eq!(answer("7 / 2"), "3.5");
        assert_eq!(answer("17 % 5"), "2");
        assert_eq!(answer("1,000 × 3 ="), "3000");
        assert_eq!(answer("58 - 2 * 20"), "18");
        assert_eq!(
            answer("99999999999999 * 99999999999999"),
            "9999999999999800000000000001"
        );
    }

    #[test]
    fn bad_and_huge_expressions_are_errors_not_crashes() {
        assert_eq!(answer("1/0"), "error: division by zero");
        assert_eq!(answer("5 % 0"), "error: division by zero");
        assert_eq!(answer("0 ** -1"), "error: division by zero");
        assert_eq!(answer("10**10**10"), OVERFLOW);
        assert_eq!(answer("9 ** 4096"), OVERFLOW);
        assert!(answer(&"9".repeat(2000)).contains("characters"));
        assert!(answer(&"9".repeat(29)).contains("29 digits"));
        assert!(answer(&format!("{}1{}", "(".repeat(40), ")".repeat(40))).contains("nested"));
        assert!(answer(&"-".repeat(100)).starts_with("error"));
        assert!(answer("import os").starts_with("error"));
        assert!(answer("2 ** 0.5").contains("whole-number"));
        assert!(answer("(1 + 2").contains("not closed"));
        assert!(answer("1 +").contains("ends too early"));
        assert!(answer("").contains("empty"));
        assert!(answer("1.2.3").contains("not a number"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any text the model might write between tool tokens: an answer or an error, quickly.
        #[test]
        fn any_expression_ends_in_a_value_or_an_error(expr in "[0-9+*/%^().x× -]{0,80}") {
            let started = std::time::Instant::now();
            let a = answer(&expr);
            proptest::prop_assert!(!a.is_empty());
            proptest::prop_assert!(started.elapsed().as_millis() < 100, "{expr:?} took long");
        }
    }
}

//! Authentication: JWTs, password hashing and the Bearer extractor.

pub mod extractor;
pub mod jwt;
pub mod password;

pub use extractor::AuthUser;
pub use jwt::{Claims, JwtKeys, TokenKind};
pub use password::Passwords;

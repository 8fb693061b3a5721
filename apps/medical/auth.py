"""Password hashing for the review UI's local accounts: scrypt with a random salt, constant-time checks."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from core.errors import InputValidationError

# scrypt cost (RFC 7914): n=2**14, r=8, p=1 takes ~16 MiB and tens of milliseconds per check.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    """Hash a password for storage: ``scrypt$n$r$p$<salt hex>$<key hex>``.

    Raises:
        InputValidationError: a password shorter than 8 characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InputValidationError(
            f"password: expected at least {MIN_PASSWORD_LENGTH} characters, got {len(password)}"
        )
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_BYTES
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a hash from `hash_password` (constant-time comparison).

    Raises:
        InputValidationError: `stored` is not a hash this module wrote.
    """
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise InputValidationError("password hash: expected 'scrypt$n$r$p$salt$key', got another format")
    n, r, p = (int(v) for v in parts[1:4])
    salt, expected = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected))
    return hmac.compare_digest(key, expected)


def generate_password() -> str:
    """A random password for a new account (printed once, never stored in clear)."""
    return secrets.token_urlsafe(12)

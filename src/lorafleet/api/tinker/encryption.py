"""age encryption of external weight exports (`save_weights_external(age_encryption_recipients=)`).

What the cookbook's `weights.download()` expects of a `weights/` checkpoint: it saves an
external export encrypted to a key it generated, and then every file the export's signed URLs
list must be `<name>.age`, age-encrypted to that key; it decrypts each one (`pyrage`) into
`<name>`. So an encrypted export stores only `.age` files (its provenance is the checkpoint's
row, never a file). Recipients are X25519 (`age1...`) or SSH (`ssh-ed25519 ...`,
`ssh-rsa ...`) public keys, checked when the call is made, before any work is queued.
"""

from __future__ import annotations

from typing import Any

from lorafleet.errors import InvalidRequest

AGE_SUFFIX = ".age"
MAX_RECIPIENTS = 16


def parse_recipients(recipients: list[str] | None) -> list[str]:
    """The recipients, each checked to parse as an age public key; InvalidRequest otherwise."""
    if not recipients:
        return []
    if len(recipients) > MAX_RECIPIENTS:
        raise InvalidRequest(f"age_encryption_recipients: at most {MAX_RECIPIENTS} recipients, "
                             f"got {len(recipients)}")
    for i, r in enumerate(recipients):
        _recipient(r, f"age_encryption_recipients[{i}]")
    return list(recipients)


def _recipient(text: str, where: str) -> Any:
    import pyrage

    try:
        if text.startswith("age1"):
            return pyrage.x25519.Recipient.from_str(text)
        if text.startswith("ssh-"):
            return pyrage.ssh.Recipient.from_str(text)
    except pyrage.RecipientError as e:
        raise InvalidRequest(f"{where} is not a valid age public key: {e}") from e
    raise InvalidRequest(f"{where} must be an age X25519 public key (age1...) or an SSH public key "
                         f"(ssh-ed25519 ..., ssh-rsa ...), got {text[:24]!r}")


def encrypt_files(files: dict[str, bytes], recipients: list[str]) -> dict[str, bytes]:
    """Each file as `<name>.age`, encrypted to every recipient (binary age format)."""
    import pyrage

    keys = [_recipient(r, "recipient") for r in recipients]
    return {f"{name}{AGE_SUFFIX}": pyrage.encrypt(data, keys) for name, data in files.items()}


def downloadable(name: str, meta: dict[str, Any] | None) -> bool:
    """Whether a checkpoint file gets a signed URL: all of a plain export, only the `.age` files
    of an encrypted one."""
    return not (meta or {}).get("age_encrypted") or name.endswith(AGE_SUFFIX)

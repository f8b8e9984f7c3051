"""TPM2 policy digests, computed the way the TPM computes them (for ``status``).

A systemd-tpm2 token seals its key to a policy digest (``tpm2-policy-hash``).
With a plain PCR policy that digest depends only on the selected PCRs'
values and whether a PIN is set, so whether the next boot will unseal the
token can be checked in the running system: compute the digest from the
values the PCRs will have and compare.  TPM 2.0 Library Part 3:

- PolicyPCR: ``new = H(old || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(PCR values))``
  with the values in ascending PCR order, H the session's hash;
- PolicyAuthValue: ``new = H(old || TPM_CC_PolicyAuthValue)``;

starting from the all-zero digest.  systemd's policy sessions always use
SHA-256, whatever the PCR bank (tpm2-util.c), and
tpm2_calculate_sealing_policy() adds PolicyPCR before PolicyAuthValue (a
signed policy's PolicyAuthorize and pcrlock's PolicyAuthorizeNV would come
first: those depend on files this module does not see).  It skips PolicyPCR
when no PCR is selected.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping

TPM_CC_POLICY_PCR = 0x0000017F
TPM_CC_POLICY_AUTH_VALUE = 0x0000016B
# TPM_ALG_ID of each PCR bank.
BANK_ALGORITHMS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
POLICY_HASH = "sha256"  # systemd's session hash
PCR_SELECT_BYTES = 3  # 24 PCRs, as systemd and tpm2-tools select them
MAX_PCR = 23


def digest_size(bank: str) -> int:
    return hashlib.new(bank).digest_size


def pcr_selection(bank: str, pcrs: list[int]) -> bytes:
    """TPML_PCR_SELECTION with one TPMS_PCR_SELECTION: count, hash, sizeofSelect, bitmap."""
    bitmap = 0
    for pcr in pcrs:
        if not 0 <= pcr <= MAX_PCR:
            raise ValueError(f"PCR {pcr} out of range (0-{MAX_PCR})")
        bitmap |= 1 << pcr
    return struct.pack(">IHB", 1, BANK_ALGORITHMS[bank], PCR_SELECT_BYTES) + bitmap.to_bytes(
        PCR_SELECT_BYTES, "little"
    )


def policy_pcr(old: bytes, bank: str, values: Mapping[int, bytes]) -> bytes:
    """The digest after TPM2_PolicyPCR on ``values`` (PCR -> value in ``bank``)."""
    size = digest_size(bank)
    for pcr, value in values.items():
        if len(value) != size:
            raise ValueError(f"PCR {pcr}: {len(value)} bytes, a {bank} value has {size}")
    order = sorted(values)
    pcr_digest = hashlib.new(POLICY_HASH, b"".join(values[p] for p in order)).digest()
    return hashlib.new(
        POLICY_HASH,
        old + struct.pack(">I", TPM_CC_POLICY_PCR) + pcr_selection(bank, order) + pcr_digest,
    ).digest()


def policy_auth_value(old: bytes) -> bytes:
    return hashlib.new(POLICY_HASH, old + struct.pack(">I", TPM_CC_POLICY_AUTH_VALUE)).digest()


def sealing_policy(bank: str, values: Mapping[int, bytes], *, pin: bool) -> bytes:
    """systemd's policy digest for a PCR-only token (no public key, no pcrlock)."""
    digest = bytes(hashlib.new(POLICY_HASH).digest_size)
    if values:
        digest = policy_pcr(digest, bank, values)
    if pin:
        digest = policy_auth_value(digest)
    return digest


def parse_pcr_value(text: str, bank: str) -> bytes:
    """A PCR as the kernel's sysfs prints it (``/sys/class/tpm/tpm0/pcr-sha256/7``: hex)."""
    # Exactly 2 * size ASCII hex digits and the newline: bytes.fromhex would
    # also take spaces (a value of the wrong size) and int() other digits.
    value = text.removesuffix("\n")
    size = digest_size(bank)
    if len(value) != 2 * size:
        raise ValueError(f"expected {2 * size} hex digits for a {bank} PCR, got {len(value)}")
    if not re.fullmatch(r"[0-9a-fA-F]+", value):
        raise ValueError(f"not hexadecimal: {value[:80]!r}")
    return bytes.fromhex(value)

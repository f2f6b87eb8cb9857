"""The token cache (kdrun/data/tokens.py, columns.py): a damaged cache file (truncated, empty, a directory, a flipped
bit, no completion mark) is detected and rebuilt once, and a full disk tokenises in memory."""
import os
from pathlib import Path

import pytest


def _flip(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of the token ids: still a valid Arrow file, still ids in range
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncate", "zero_bytes", "directory", "flip_bit", "no_mark"])
@pytest.mark.parametrize("how", ["texts", "column"])
def test_a_damaged_token_cache_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, minilm_dir, damage, how):
    """Defect 5: a truncated, zero-byte, directory or bit-flipped tokens-*.arrow gave a pyarrow traceback on every later
    run, or trained silently on wrong ids. Each is detected (checksum, completion mark) and rebuilt, once."""

    from transformers import AutoTokenizer

    from kdrun.data import columns, tokens

    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    texts = [f"passage number {i} about the topic of {i % 7} things" for i in range(300)]
    if how == "texts":
        build = lambda: (lambda t, hit: ([t.ids[x] for x in texts], hit))(
            *tokens.pretokenize(tok, texts, 32, tmp_path / "tokens", "fp"))
    else:
        (tmp_path / "c.tsv").write_text("".join(f"p{i}\t{t}\n" for i, t in enumerate(texts)))
        column = columns.text_column("collection", str(tmp_path / "c.tsv"))
        build = lambda: (lambda r, hit: (r.ids(range(len(texts))), hit))(
            *tokens.tokenize_column(tok, column, 32, tmp_path / "tokens", "fp"))
    want, hit = build()
    assert not hit and want == tok(texts, truncation=True, max_length=32)["input_ids"]
    [f] = [p for p in (tmp_path / "tokens").glob("*.arrow")]
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif damage == "zero_bytes":
        f.write_bytes(b"")
    elif damage == "directory":
        f.unlink()
        f.mkdir()
    elif damage == "flip_bit":
        _flip(f)
    else:
        Path(str(f) + ".sha256").unlink()
    got, hit = build()
    assert not hit and got == want
    assert "rebuilding it" in caplog.text
    caplog.clear()
    got, hit = build()
    assert hit and got == want and "rebuilding" not in caplog.text


def test_a_token_cache_on_a_full_disk_tokenises_in_memory(tmp_path, monkeypatch, caplog, minilm_dir):
    import errno

    import datasets
    from transformers import AutoTokenizer

    from kdrun.data import tokens

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    texts = ["one text", "another one", "a third"]
    real = datasets.Dataset.map

    def full(self, *args, cache_file_name=None, **kwargs):
        if cache_file_name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", full)
    table, hit = tokens.pretokenize(tok, texts, 32, tmp_path / "tokens", "fp")
    assert not hit and [table.ids[t] for t in texts] == tok(texts, truncation=True, max_length=32)["input_ids"]
    assert "No space left on device" in caplog.text and not list((tmp_path / "tokens").glob("*.sha256"))

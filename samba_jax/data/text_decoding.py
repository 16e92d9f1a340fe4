"""UTF-8 decoding that never fails, and the text sources' counts of what it replaced or skipped.

Shared by the file sources (`sources.py`), the TFDS source (`tfds_source.py`) and the prepare CLI,
so each reads bytes the same way: invalid bytes become U+FFFD, counted, and empty documents are
counted (the pipeline skips them), each with one warning the first time it happens.
"""

from __future__ import annotations

import logging


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decodes UTF-8 like `errors="replace"`; returns (text, invalid byte count)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    pieces, bad, position = [], 0, 0
    while True:
        try:
            pieces.append(data[position:].decode("utf-8"))
            return "".join(pieces), bad
        except UnicodeDecodeError as e:
            pieces.append(data[position : position + e.start].decode("utf-8") + "\ufffd")
            bad += e.end - e.start
            position += e.end


class CountingTextSource:
    """Shared `stats` bookkeeping of the text sources."""

    def _init_stats(self) -> None:
        self.stats = {"documents_read": 0, "empty_documents": 0,
                      "invalid_utf8_documents": 0, "replaced_bytes": 0}

    def _decode(self, data: bytes, where: str) -> str:
        text, bad = decode_utf8(data)
        self.stats["documents_read"] += 1
        if bad:
            if not self.stats["invalid_utf8_documents"]:
                logging.warning("%s: %d invalid UTF-8 bytes replaced by U+FFFD (counted in"
                                " %r.stats from now on).", where, bad, self)
            self.stats["invalid_utf8_documents"] += 1
            self.stats["replaced_bytes"] += bad
        return text

    def _count_if_empty(self, text: str, where: str) -> str:
        if not text.strip():
            if not self.stats["empty_documents"]:
                logging.warning("%s: empty document skipped (counted in %r.stats).", where, self)
            self.stats["empty_documents"] += 1
        return text

    def __getstate__(self):
        # Worker copies start counting from zero.
        return {k: v for k, v in self.__dict__.items() if k != "stats"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_stats()

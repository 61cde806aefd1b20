"""One meaning of a megabyte: 2**20 bytes (MiB), in logs, configs and profiles alike.

``aggregation.max-message-mb`` and the round line's byte counts are MiB; the only decimal figure is the
FlowerTune leaderboard's communication budget, which it states in MB of its own counting.
"""

MiB = 1 << 20


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, as every size this package prints."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError

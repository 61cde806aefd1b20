"""One meaning of a megabyte: MiB."""

import pytest

from flowertune_llm.units import MiB, human_bytes


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (MiB, "1.0 MiB"), (141_000_000_000, "131.3 GiB"), (3 * 2**40, "3.0 TiB")],
)
def test_sizes_print_in_binary_units(n, text):
    assert human_bytes(n) == text

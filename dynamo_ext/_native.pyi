from collections.abc import Sequence

def token_block_hashes(
    tokens: Sequence[int] | memoryview, block_size: int, parent: int = 0
) -> list[int]: ...
def gpu_walk(tier: dict[int, int], hashes: Sequence[int], alive: int) -> dict[int, int]: ...
def store_blocks(tier: dict[int, int], hashes: Sequence[int], bit: int) -> int: ...
def stored_tokens(
    raw: bytes | memoryview,
    block_size: int,
    parent: int,
    hashes: Sequence[int],
    xlat: dict[int, int],
) -> list[int]: ...

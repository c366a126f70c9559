"""BlockPool: reference counts, cached pages, LRU eviction; page_keys: equal keys iff equal prefixes."""
import pytest

from cptoolkit.inference.block_pool import BlockPool, page_keys


def test_page_keys_chain_every_token_up_to_the_page_end():
    a = page_keys([1, 2, 3, 4, 5, 6, 7], page_tokens=2, num_pages=3)
    assert len(a) == 3 and len(set(a)) == 3
    assert page_keys([1, 2, 3, 4, 9, 9], 2, 3)[:2] == a[:2]  # same first 4 tokens
    assert page_keys([1, 2, 3, 4, 9, 9], 2, 3)[2] != a[2]
    assert page_keys([0, 2, 3, 4, 5, 6], 2, 3)[1] != a[1]  # an earlier token changes every later key
    assert page_keys([12, 3], 1, 2) != page_keys([1, 23], 1, 2)
    with pytest.raises(ValueError, match="num_pages = 4: 4 pages of 2 tokens need 8 tokens"):
        page_keys([1, 2, 3], 2, 4)


def test_released_pages_stay_cached_until_evicted_least_recently_used_first():
    pool = BlockPool(4)
    keys = page_keys(list(range(8)), 2, 4)
    first = pool.allocate(2)
    pool.register(first[0], keys[0])
    pool.register(first[1], keys[1])
    pool.release(first)
    assert pool.num_available == 4 and pool.num_cached_pages == 2
    assert pool.match(keys) == first and pool.match(keys[2:]) == []
    pool.acquire(pool.match(keys[:1]))  # a hit on page 0 makes it in use again
    assert pool.can_allocate(3, []) and not pool.can_allocate(4, [])
    assert not pool.can_allocate(3, [first[1]])  # reusing page 1 takes it off the evictable list
    taken = pool.allocate(3)  # 2 free blocks, then the evictable page 1
    assert first[1] in taken and pool.match(keys) == [first[0]]
    pool.release([first[0], *taken])
    assert pool.num_available == 4 and pool.match(keys[:1]) == [first[0]]


def test_shared_blocks_are_freed_by_the_last_holder():
    pool = BlockPool(2)
    key = page_keys([5, 6], 2, 1)[0]
    (block,) = pool.allocate(1)
    pool.register(block, key)
    pool.acquire([block])  # a second request shares the page
    pool.release([block])
    assert pool.num_available == 1  # still held by the other
    pool.release([block])
    assert pool.num_available == 2 and pool.match([key]) == [block]
    with pytest.raises(ValueError, match=r"allocate\(3\): only 2 of 2 blocks"):
        pool.allocate(3)

"""The embedded offline suite: a small CLIP-architecture expert zoo trained here on real data.

    from epmq.families.offline.zoo import build_zoo, open_zoo
    root = build_zoo("default")          # cached under ~/.cache/epmq/zoo (or $EPMQ_CACHE/zoo)
    zoo = open_zoo(root)
    expert = zoo.tower("mnist"); head = zoo.head("mnist")
"""

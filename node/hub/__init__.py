"""Models from the Hugging Face hub: repo ids, the local hub cache, downloads, MTP sidecars.

refs.py       "org/name@rev" -> RepoRef; the hub's settings (HF_HOME, HF_HUB_CACHE,
              HF_HUB_OFFLINE, HF_ENDPOINT) read when asked, not at import
cache.py      a repo's snapshot in the local hub cache (through ``huggingface_hub``)
remote.py     a repo's files with the hub's sizes and hashes; ranged reads
shards.py     which files a stage needs for its layers (pure)
download.py   resumable, verified downloads into the hub cache, with progress
mtp.py        the MTP sidecar of a stripped conversion, by ranged reads of its source repo
card.py       a repo's card before its weights are here (config.json + shard headers)
pull.py       ``macmesh pull`` / ``launch --pull``: MODEL -> repo -> files in the hub cache
service.py    HubService: a node downloads its part of a model when its coordinator asks
"""

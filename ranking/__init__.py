"""STR ranking: embed sampled answers, rank them by TextRank centrality, drop near-duplicates
with ISODATA, and turn the ranked representatives into (winner, loser) pairs.

Pure CPU; knows nothing of PPO, accelerate or config files.
"""

"""Operations: getting weights onto disk (pull, preload), the launchd agent, and the command-line client.

Nothing in this package imports MLX; downloads run in whatever thread calls them and never touch the engine.
"""

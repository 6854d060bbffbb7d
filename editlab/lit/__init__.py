"""Lightning pieces: the edit loop and the callback that runs editors in it."""

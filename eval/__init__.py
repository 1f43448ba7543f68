"""After the sweep: held-out generation and scoring, selection, merge and the leaderboard."""

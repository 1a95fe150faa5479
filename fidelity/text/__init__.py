"""Text problems: the movie-review snippets and the pretrained MiniLM encoder."""

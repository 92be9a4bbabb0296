"""runticker's parts: plain classes with their collaborators passed in."""

"""Small dataset folders the tests build from the synthetic one."""

import shutil


def class_copy(source, target, classes, train=12, test=10):
    """The first ``classes`` classes of the synthetic dataset, fewer images: a folder in calbench's layout."""
    lines = (source / "classnames.txt").read_text().splitlines()[:classes]
    for split, count in (("train", train), ("test", test)):
        for line in lines:
            folder = line.split()[0]
            (target / "images" / split / folder).mkdir(parents=True)
            for image in sorted((source / "images" / split / folder).iterdir())[:count]:
                shutil.copy(image, target / "images" / split / folder / image.name)
    (target / "classnames.txt").write_text("".join(f"{line}\n" for line in lines))
    return target

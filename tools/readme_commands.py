"""Print the commands of the first ```bash block of a README, one a line.

.ci/run runs them, so CI runs exactly what the README tells a new user.
Lines that are empty or only a comment are skipped.
"""
import sys


def readme_commands(path):
    commands, inside = [], False
    with open(path, encoding='utf-8') as f:
        for line in f:
            stripped = line.strip()
            if not inside:
                inside = stripped == '```bash'
                continue
            if stripped == '```':
                break
            if stripped and not stripped.startswith('#'):
                commands.append(stripped)
    return commands


if __name__ == '__main__':
    print('\n'.join(readme_commands(sys.argv[1] if len(sys.argv) > 1
                                    else 'README.md')))

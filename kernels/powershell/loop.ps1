# The PowerShell side of ampoule's PowerShell kernel (see kernel.py). Reads cell paths from
# the requests FIFO, dot-sources each one in this script's scope (so variables and functions
# persist) and answers on the replies FIFO, one line per message, fields base64:
#   HELLO <version>    ERROR <name> <message> <traceback>    DONE ok|error
# Pipeline output is formatted to stdout; error records go to stderr.
param([string]$Requests, [string]$Replies)

function B64([string]$s) { [Convert]::ToBase64String([Text.Encoding]::UTF8.GetBytes("$s")) }

$reader = [IO.StreamReader]::new([IO.FileStream]::new($Requests, 'Open', 'Read', 'ReadWrite'))
$writer = [IO.StreamWriter]::new([IO.FileStream]::new($Replies, 'Open', 'Write', 'ReadWrite'))
$writer.AutoFlush = $true
$writer.WriteLine("HELLO " + (B64 "PowerShell $($PSVersionTable.PSVersion)"))

while ($null -ne ($__ampoule_cell = $reader.ReadLine())) {
    $__ampoule_status = 'ok'
    try {
        . $__ampoule_cell 2>&1 | ForEach-Object {
            if ($_ -is [Management.Automation.ErrorRecord]) {
                [Console]::Error.WriteLine(($_ | Out-String).TrimEnd())
            } else {
                $_ | Out-String -Stream | ForEach-Object { [Console]::Out.WriteLine($_) }
            }
        }
    } catch {
        $__ampoule_status = 'error'
        $e = $_.Exception
        $trace = (($_ | Out-String).TrimEnd() + "`n" + $_.ScriptStackTrace).Trim()
        $writer.WriteLine("ERROR " + (B64 $e.GetType().Name) + " " + (B64 $e.Message) + " " + (B64 $trace))
    }
    [Console]::Out.Flush()
    [Console]::Error.Flush()
    $writer.WriteLine("DONE $__ampoule_status")
}
